rule summary:
    input:
        evals=eval_targets(),
        serving=serving_targets(),
    output:
        json=f"{RESULTS}/summary.json",
        md=f"{RESULTS}/summary.md",
    params:
        job=job_label("summary"),
    resources:
        **job_resources("cpu", "summary"),
    log:
        f"{RESULTS}/logs/summary.log",
    benchmark:
        f"{RESULTS}/benchmarks/summary.tsv"
    conda:
        "../../envs/snaketune.yaml"
    shell:
        "SNAKETUNE_JOB={params.job:q} python -m snaketune.summary"
        " --evals {input.evals} --serving {input.serving} --out-json {output.json} --out-md {output.md} > {log} 2>&1"
