# A recipe trains a full model folder or a PEFT adapter folder (is_adapter): one rule, two outputs.
FULL_RECIPES = [r for r in config["recipes"] if not is_adapter(r)]
ADAPTER_RECIPES = [r for r in config["recipes"] if is_adapter(r)]


rule train_full:
    input:
        unpack(train_input),
    output:
        directory(f"{RESULTS}/{{model}}/{{recipe}}/model"),
    wildcard_constraints:
        recipe=_alternatives(FULL_RECIPES),
    params:
        job=job_label("train_full"),
        spec=train_spec,
        checkpoints=lambda wc: f"{RESULTS}/{wc.model}/{wc.recipe}/checkpoints",
        cache=CACHE,
        module=lambda wc: STAGES[config["recipes"][wc.recipe]["stage"]].step,
    threads: lambda wc: config["recipes"][wc.recipe]["threads"]  # the CPU threads the step uses
    resources:
        **job_resources("gpu", "train_full", "recipes", "recipe"),
    log:
        f"{RESULTS}/logs/{{model}}/{{recipe}}/train.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{model}}/{{recipe}}/train.tsv"
    conda:
        "../../envs/snaketune.yaml"
    shell:
        "SNAKETUNE_JOB={params.job:q} python -m snaketune.launch --gpus {resources.gpu} --nodes {resources.nodes}"
        " -- python -m snaketune.{params.module} --base {input.base} --data {input.data} --params {params.spec:q}"
        " --out {output} --checkpoints {params.checkpoints} --cache-dir {params.cache}"
        " --model-name {wildcards.model} --variant {wildcards.recipe} > {log} 2>&1"


use rule train_full as train_adapter with:
    output:
        directory(f"{RESULTS}/{{model}}/{{recipe}}/adapter"),
    wildcard_constraints:
        recipe=_alternatives(ADAPTER_RECIPES),
    params:
        job=job_label("train_adapter"),
    resources:
        **job_resources("gpu", "train_adapter", "recipes", "recipe"),
