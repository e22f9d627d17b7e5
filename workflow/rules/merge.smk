# Adapters that merge into a model folder (a reward model's adapter scores, it is not merged).
MERGEABLE_RECIPES = [r for r, recipe in config["recipes"].items() if is_adapter(r) and recipe["stage"] != "rm"]


rule merge_adapter:
    input:
        base=merge_base,
        adapter=f"{RESULTS}/{{model}}/{{recipe}}/adapter",
    output:
        directory(f"{RESULTS}/{{model}}/{{recipe}}/model"),
    wildcard_constraints:
        recipe=_alternatives(MERGEABLE_RECIPES),
    params:
        job=job_label("merge_adapter"),
    resources:
        **job_resources("cpu", "merge_adapter", model_input="base"),
    log:
        f"{RESULTS}/logs/{{model}}/{{recipe}}/merge.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{model}}/{{recipe}}/merge.tsv"
    conda:
        "../../envs/snaketune.yaml"
    shell:
        "SNAKETUNE_JOB={params.job:q} python -m snaketune.merge"
        " --base {input.base} --adapter {input.adapter} --out {output} > {log} 2>&1"
