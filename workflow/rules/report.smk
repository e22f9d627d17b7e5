# Report figures (`snakemake --report`) and the paper-reproduction bundle (issue 7).
#   snakemake --cores 2 plots                      figures under results/report/
#   snakemake --report results/report.html plots   the self-contained HTML report
#   snakemake --cores 2 bundle                     results/bundles/<study>.tar.gz (report included)

import os


# Training runs the evaluated variants depend on (recipes and their `from` chains): their folders
# hold training.json (loss per step, tokens/s) for the figures.
TRAINED_RECIPES = []
for _variant in config["evaluation"]["variants"]:
    _stem = _variant.partition("/")[0]
    while _stem != "base" and _stem not in TRAINED_RECIPES:
        TRAINED_RECIPES.append(_stem)
        _stem = config["recipes"][_stem]["from"]
TRAIN_OUTPUTS = [
    f"{RESULTS}/{m}/{r}/{'adapter' if is_adapter(r) else 'model'}"
    for m in (config["evaluation"].get("models") or list(config["models"]))
    for r in sorted(TRAINED_RECIPES)
]

REPORT_DIR = f"{RESULTS}/report"


rule plots:
    input:
        summary=f"{RESULTS}/summary.json",
        summary_md=f"{RESULTS}/summary.md",
        train=TRAIN_OUTPUTS,
        serving=serving_targets(),
    output:
        loss=report(f"{REPORT_DIR}/loss.png", caption="../report/loss.rst", category="Training"),
        scores=report(f"{REPORT_DIR}/eval_scores.png", caption="../report/eval_scores.rst", category="Evaluation"),
        table=report(f"{REPORT_DIR}/eval_table.html", caption="../report/eval_table.rst", category="Evaluation"),
        speed=report(
            f"{REPORT_DIR}/throughput_memory.png", caption="../report/throughput_memory.rst", category="Resources"
        ),
        numbers=f"{REPORT_DIR}/numbers.json",
    params:
        job=job_label("plots"),
        out=lambda wc, output: os.path.dirname(output.numbers),
    resources:
        **job_resources("cpu", "plots"),
    log:
        f"{RESULTS}/logs/plots.log",
    benchmark:
        f"{RESULTS}/benchmarks/plots.tsv"
    conda:
        "../../envs/snaketune.yaml"
    shell:
        "SNAKETUNE_JOB={params.job:q} python -m snaketune.report --summary {input.summary}"
        " --summary-md {input.summary_md} --train {input.train} --serving {input.serving}"
        " --out {params.out} > {log} 2>&1"


# The snakemake call that builds the report of this study; the bundle job runs it and appends
# --configfile <the resolved config> --report FILE.
REPORT_COMMAND = json.dumps(
    ["snakemake", "--snakefile", workflow.main_snakefile, "--directory", os.getcwd(), "--nolock", "plots"]
)


rule bundle:
    input:
        rules.plots.output,
        summary=f"{RESULTS}/summary.json",
    output:
        f"{RESULTS}/bundles/{config['study']}.tar.gz",
    params:
        job=job_label("bundle"),
        config=params_json(config),
        repo=workflow.basedir,
        report=REPORT_COMMAND,
        results=lambda wc, input: os.path.dirname(input.summary),
        weights="--include-weights" if config["reproduce"]["include_weights"] else "",
    resources:
        **job_resources("cpu", "bundle"),
    log:
        f"{RESULTS}/logs/bundle.log",
    benchmark:
        f"{RESULTS}/benchmarks/bundle.tsv"
    conda:
        "../../envs/snaketune.yaml"
    shell:
        "SNAKETUNE_JOB={params.job:q} python -m snaketune.bundle pack --config {params.config:q}"
        " --repo {params.repo:q} --results {params.results} --make-report {params.report:q} {params.weights}"
        " --out {output} > {log} 2>&1"
