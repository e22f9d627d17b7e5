rule summary:
    input:
        eval_targets(),
    output:
        json=f"{RESULTS}/summary.json",
        md=f"{RESULTS}/summary.md",
    params:
        tracking=lambda wc: tracking_env("summary", wc),
    resources:
        **step_resources("cpu"),
    log:
        f"{RESULTS}/logs/summary.log",
    conda:
        "../../envs/snaketune.yaml"
    shell:
        "SNAKETUNE_TRACKING={params.tracking:q} python -m snaketune.summary"
        " --evals {input} --out-json {output.json} --out-md {output.md} > {log} 2>&1"
