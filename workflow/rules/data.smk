rule prepare_data:
    input:
        dataset_files,
    output:
        directory(f"{RESULTS}/datasets/{{dataset}}"),
    params:
        job=job_label("prepare_data"),
        spec=lambda wc: params_json(with_seed(config["datasets"][wc.dataset])),
    resources:
        **job_resources("cpu", "prepare_data"),
    log:
        f"{RESULTS}/logs/datasets/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/datasets/{{dataset}}.tsv"
    conda:
        "../../envs/snaketune.yaml"
    shell:
        "SNAKETUNE_JOB={params.job:q} python -m snaketune.data"
        " --params {params.spec:q} --out {output} > {log} 2>&1"
