rule prepare_data:
    output:
        directory(f"{RESULTS}/datasets/{{dataset}}"),
    params:
        spec=lambda wc: params_json(with_seed(config["datasets"][wc.dataset])),
        tracking=lambda wc: tracking_env("prepare_data", wc),
    resources:
        **step_resources("cpu"),
    log:
        f"{RESULTS}/logs/datasets/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/datasets/{{dataset}}.tsv"
    conda:
        "../../envs/snaketune.yaml"
    shell:
        "SNAKETUNE_TRACKING={params.tracking:q} python -m snaketune.data"
        " --params {params.spec:q} --out {output} > {log} 2>&1"
