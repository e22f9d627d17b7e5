rule fetch_model:
    output:
        directory(f"{RESULTS}/{{model}}/base/model"),
    params:
        spec=lambda wc: params_json(with_seed(config["models"][wc.model])),
        tracking=lambda wc: tracking_env("fetch_model", wc),
    resources:
        **step_resources("cpu"),
    log:
        f"{RESULTS}/logs/{{model}}/fetch_model.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{model}}/fetch_model.tsv"
    conda:
        "../../envs/snaketune.yaml"
    shell:
        "SNAKETUNE_TRACKING={params.tracking:q} python -m snaketune.model"
        " --params {params.spec:q} --out {output} > {log} 2>&1"
