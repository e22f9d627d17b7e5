rule merge_adapter:
    input:
        base=merge_base,
        adapter=f"{RESULTS}/{{model}}/{{recipe}}/adapter",
    output:
        directory(f"{RESULTS}/{{model}}/{{recipe}}/model"),
    wildcard_constraints:
        recipe=_alternatives(ADAPTER_RECIPES),
    params:
        tracking=lambda wc: tracking_env("merge_adapter", wc),
    resources:
        **step_resources("cpu"),
    log:
        f"{RESULTS}/logs/{{model}}/{{recipe}}/merge.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{model}}/{{recipe}}/merge.tsv"
    conda:
        "../../envs/snaketune.yaml"
    shell:
        "SNAKETUNE_TRACKING={params.tracking:q} python -m snaketune.merge"
        " --base {input.base} --adapter {input.adapter} --out {output} > {log} 2>&1"
