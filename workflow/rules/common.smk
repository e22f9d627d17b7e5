"""Config validation, path helpers and input functions shared by the rules."""

import json
import subprocess

from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config.yaml"


def _config_problems(schema_path):
    """Every schema violation as 'key.path: message', for a readable stop."""
    import jsonschema
    import yaml

    schema = yaml.safe_load(open(schema_path))
    validator = jsonschema.validators.validator_for(schema)(schema)
    lines = []
    for err in sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path))):
        where = ".".join(map(str, err.absolute_path)) or "<top level>"
        lines.append(f"{where}: {err.message}")
    return lines


try:
    validate(config, schema="../schemas/config.schema.yaml", set_default=True)
except WorkflowError:
    problems = _config_problems(Path(workflow.basedir) / "schemas/config.schema.yaml")
    raise WorkflowError(
        "the config does not match workflow/schemas/config.schema.yaml:\n  "
        + "\n  ".join(problems)
        + "\nFix these keys (README.md lists every key and its meaning)."
    ) from None

RESULTS = "results"
LORA_TYPES = ("lora", "dora", "rslora", "pissa", "olora")


def _git_commit():
    try:
        out = subprocess.run(["git", "-C", workflow.basedir, "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


GIT_COMMIT = _git_commit()


def _check_references():
    """Fail before any job if a name points at nothing; say which key to fix."""
    problems = []
    for name, recipe in config["recipes"].items():
        if recipe["dataset"] not in config["datasets"]:
            problems.append(f"recipes.{name}.dataset: {recipe['dataset']!r} is not a key of datasets")
        if recipe["from"] != "base" and recipe["from"] not in config["recipes"]:
            problems.append(f"recipes.{name}.from: {recipe['from']!r} is neither 'base' nor a recipe")
    for name, quant in config.get("quantize", {}).items():
        if quant.get("dataset") and quant["dataset"] not in config["datasets"]:
            problems.append(f"quantize.{name}.dataset: {quant['dataset']!r} is not a key of datasets")
    for name, bench in config["benches"].items():
        if bench["dataset"] not in config["datasets"]:
            problems.append(f"benches.{name}.dataset: {bench['dataset']!r} is not a key of datasets")
    for model in config["evaluation"].get("models", []):
        if model not in config["models"]:
            problems.append(f"evaluation.models: {model!r} is not a key of models")
    for bench in config["evaluation"]["benches"]:
        if bench not in config["benches"]:
            problems.append(f"evaluation.benches: {bench!r} is not a key of benches")
    for variant in config["evaluation"]["variants"]:
        stem, _, quant = variant.partition("/")
        if stem != "base" and stem not in config["recipes"]:
            problems.append(f"evaluation.variants: {variant!r}: {stem!r} is neither 'base' nor a recipe")
        if quant and quant not in config.get("quantize", {}):
            problems.append(f"evaluation.variants: {variant!r}: {quant!r} is not a key of quantize")
    if problems:
        raise WorkflowError("config.yaml has problems:\n  " + "\n  ".join(problems))


_check_references()


def _alternatives(names):
    return "|".join(sorted(names)) or "^$"


wildcard_constraints:
    model=_alternatives(config["models"]),
    dataset=_alternatives(config["datasets"]),
    recipe=_alternatives(config["recipes"]),
    quant=_alternatives(config.get("quantize", {})),
    bench=_alternatives(config["benches"]),
    stem=_alternatives(["base", *config["recipes"]]),


def is_adapter(recipe):
    return config["recipes"][recipe]["train_type"] in LORA_TYPES


def model_dir(model, stem):
    """HF model folder of a variant stem: base, or a recipe (merged when it is an adapter)."""
    return f"{RESULTS}/{model}/{stem}/model"


def train_input(wildcards):
    recipe = config["recipes"][wildcards.recipe]
    return {
        "base": model_dir(wildcards.model, recipe["from"]),
        "data": f"{RESULTS}/datasets/{recipe['dataset']}",
    }


def merge_base(wildcards):
    return model_dir(wildcards.model, config["recipes"][wildcards.recipe]["from"])


def eval_model(wildcards):
    stem, _, quant = wildcards.variant.partition("/")
    return f"{RESULTS}/{wildcards.model}/{stem}/{quant}/model" if quant else model_dir(wildcards.model, stem)


def bench_data(wildcards):
    return f"{RESULTS}/datasets/{config['benches'][wildcards.bench]['dataset']}"


def quant_data(wildcards):
    dataset = config["quantize"][wildcards.quant].get("dataset") or next(iter(config["datasets"]))
    return f"{RESULTS}/datasets/{dataset}"


def with_seed(block):
    """A step's config block with the study seed filled in where it has none."""
    return {"seed": config["seed"], **block}


def params_json(block):
    return json.dumps(block, sort_keys=True)


def tracking_env(rule, wildcards):
    """JSON for SNAKETUNE_TRACKING: where to log and the tags identifying this job."""
    tags = {
        "snakemake.rule": rule,
        "snakemake.wildcards": ",".join(f"{k}={v}" for k, v in wildcards.items()),
        "snakemake.job": f"{rule}[{','.join(f'{k}={v}' for k, v in wildcards.items())}]",
        "git.commit": GIT_COMMIT,
        "study": config["study"],
    }
    return json.dumps({"uri": config["tracking"]["uri"], "experiment": config["study"], "tags": tags})


def step_resources(kind, block=None, gpu=0):
    """Resources for a job: step block > config.resources.<gpu|cpu> > built-in defaults."""
    defaults = {"gpu": gpu, "mem_mb": 4000, "runtime": 60}
    defaults.update(config["resources"].get("gpu" if gpu else "cpu", {}))
    defaults.update((block or {}).get("resources", {}))
    return defaults


def eval_targets():
    models = config["evaluation"].get("models") or list(config["models"])
    return [
        f"{RESULTS}/{m}/{v}/eval/{b}.json"
        for m in models
        for v in config["evaluation"]["variants"]
        for b in config["evaluation"]["benches"]
    ]
