rule evaluate:
    input:
        model=eval_model,
        data=bench_data,
    output:
        json=f"{RESULTS}/{{model}}/{{variant}}/eval/{{bench}}.json",
        predictions=f"{RESULTS}/{{model}}/{{variant}}/eval/{{bench}}.predictions.jsonl",
    wildcard_constraints:
        variant=r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?",
    params:
        job=job_label("evaluate"),
        module=lambda wc: EVAL_MODULES[config["benches"][wc.bench]["engine"]],
        spec=lambda wc: params_json({"name": wc.bench, **config["benches"][wc.bench]}),
    resources:
        **job_resources("gpu", "evaluate", "benches", "bench"),
    log:
        f"{RESULTS}/logs/{{model}}/{{variant}}/eval/{{bench}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{model}}/{{variant}}/eval/{{bench}}.tsv"
    conda:
        "../../envs/snaketune.yaml"
    shell:
        "SNAKETUNE_JOB={params.job:q} python -m snaketune.launch --gpus {resources.gpu}"
        " -- python -m snaketune.{params.module}"
        " --model {input.model} --data {input.data} --params {params.spec:q}"
        " --model-name {wildcards.model} --variant {wildcards.variant} --out {output.json} --predictions {output.predictions} > {log} 2>&1"
