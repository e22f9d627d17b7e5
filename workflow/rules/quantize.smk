rule quantize:
    input:
        model=lambda wc: model_dir(wc.model, wc.stem),
        data=quant_data,
    output:
        directory(f"{RESULTS}/{{model}}/{{stem}}/{{quant}}/model"),
    params:
        spec=lambda wc: params_json(with_seed(config["quantize"][wc.quant])),
        tracking=lambda wc: tracking_env("quantize", wc),
    resources:
        **step_resources("gpu", gpu=1),
    log:
        f"{RESULTS}/logs/{{model}}/{{stem}}/{{quant}}/quantize.log",
    benchmark:
        f"{RESULTS}/benchmarks/{{model}}/{{stem}}/{{quant}}/quantize.tsv"
    conda:
        "../../envs/snaketune.yaml"
    shell:
        "SNAKETUNE_TRACKING={params.tracking:q} python -m snaketune.quantize"
        " --model {input.model} --data {input.data} --params {params.spec:q} --out {output} > {log} 2>&1"
