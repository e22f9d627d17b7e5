rule serving_bench:
    input:
        model=eval_model,
    output:
        f"{RESULTS}/{{model}}/{{variant}}/serving/{{engine}}.json",
    wildcard_constraints:
        variant=r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?",
        engine="transformers|vllm",
    params:
        spec=lambda wc: params_json({**config["serving"], "engine": wc.engine}),
        job=job_label("serving_bench"),
    resources:
        **job_resources("gpu", "serving_bench"),
    log:
        f"{RESULTS}/logs/{{model}}/{{variant}}/serving/{{engine}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{model}}/{{variant}}/serving/{{engine}}.tsv"
    conda:
        "../../envs/snaketune.yaml"
    shell:
        "SNAKETUNE_JOB={params.job:q} python -m snaketune.launch --gpus {resources.gpu}"
        " -- python -m snaketune.serving_bench --model {input.model} --params {params.spec:q}"
        " --model-name {wildcards.model} --variant {wildcards.variant} --out {output} > {log} 2>&1"
