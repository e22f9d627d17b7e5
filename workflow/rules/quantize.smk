rule quantize:
    input:
        model=lambda wc: model_dir(wc.model, wc.stem),
        data=quant_data,
    output:
        directory(f"{RESULTS}/{{model}}/{{stem}}/{{quant}}/model"),
    params:
        job=job_label("quantize"),
        spec=lambda wc: params_json(with_seed(config["quantize"][wc.quant])),
    resources:
        **job_resources("gpu", "quantize", "quantize", "quant"),
    log:
        f"{RESULTS}/logs/{{model}}/{{stem}}/{{quant}}/quantize.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{model}}/{{stem}}/{{quant}}/quantize.tsv"
    conda:
        "../../envs/snaketune.yaml"
    shell:
        "SNAKETUNE_JOB={params.job:q} python -m snaketune.launch --gpus {resources.gpu}"
        " -- python -m snaketune.quantize"
        " --model {input.model} --data {input.data} --params {params.spec:q} --out {output}"
        " --model-name {wildcards.model} --variant {wildcards.stem}/{wildcards.quant} > {log} 2>&1"
