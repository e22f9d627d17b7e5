rule fetch_model:
    input:
        model_files,
    output:
        directory(f"{RESULTS}/{{model}}/base/model"),
    params:
        job=job_label("fetch_model"),
        spec=lambda wc: params_json(with_seed(config["models"][wc.model])),
    resources:
        **job_resources("cpu", "fetch_model", "models", "model"),
    log:
        f"{RESULTS}/logs/{{model}}/fetch_model.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{model}}/fetch_model.tsv"
    conda:
        "../../envs/snaketune.yaml"
    shell:
        "SNAKETUNE_JOB={params.job:q} python -m snaketune.model"
        " --params {params.spec:q} --out {output} > {log} 2>&1"
