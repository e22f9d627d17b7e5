"""The study's config: loaded (config.yaml, or the --configfile study alone), validated against
workflow/schemas/config.schema.yaml, its cross-references checked before any job, and the
questions the other rule files ask of it."""

import os

from snakemake.utils import min_version, validate

from snaketune.data import kinds
from snaketune.registry import LORA_TYPES, METHODS, STAGES


min_version("9.0")


def _check_yaml(path):
    """Stop with file:line:column on a YAML syntax error (Snakemake's own message has no line)."""
    import yaml

    if not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as fh:
            yaml.safe_load(fh)
    except UnicodeDecodeError as err:
        raise WorkflowError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}): save it as UTF-8") from None
    except yaml.YAMLError as err:
        mark, context = getattr(err, "problem_mark", None), getattr(err, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        problem = getattr(err, "problem", None) or str(err)
        if context and mark and context.line != mark.line:
            problem += f", {err.context} on line {context.line + 1}"
        raise WorkflowError(f"{where}: YAML syntax error ({problem}): fix the file there "
                            "(unclosed brackets or quotes, tabs, or wrong indentation)") from None


# config.yaml is the default study. A study given with --configfile replaces it: Snakemake would
# merge the two (the demo's models, recipes and `resources.gpu: {gpu: 0}` leaking into that study).
if not workflow.overwrite_configfiles:
    _check_yaml("config.yaml")

    configfile: "config.yaml"


def _config_problems(schema_path):
    """Every schema violation as 'key.path: message', for a readable stop."""
    import jsonschema
    import yaml

    schema = yaml.safe_load(open(schema_path))
    validator = jsonschema.validators.validator_for(schema)(schema)
    lines = []
    recipe_keys = schema["properties"]["recipes"]["additionalProperties"]["properties"]
    for err in sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path))):
        where = ".".join(map(str, err.absolute_path)) or "<top level>"
        hint = ""
        if err.validator == "additionalProperties" and list(err.absolute_path)[:1] == ["recipes"] \
                and len(err.absolute_path) == 2 and isinstance(err.instance, dict):
            stage = err.instance.get("stage")
            moved = sorted(set(err.instance) & set(recipe_keys.get(stage, {}).get("properties", {})))
            if moved:  # a stage's own keys at the recipe's top level, as before they had a block
                hint = (f" ({', '.join(moved)}: stage {stage}'s own keys go in its block, "
                        f"`{stage}: {{{moved[0]}: {err.instance[moved[0]]!r}}}`; docs/align.md)")
        lines.append(f"{where}: {err.message}{hint}")
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


def recipe_datasets(recipe):
    """The dataset keys a recipe trains on (one, or a mix)."""
    names = config["recipes"][recipe]["dataset"]
    return [names] if isinstance(names, str) else names


def is_adapter(recipe):
    return config["recipes"][recipe]["train_type"] in LORA_TYPES


def reward_models(recipe):
    """The rm recipes a grpo recipe's rewards name."""
    rewards = config["recipes"][recipe].get("grpo", {}).get("rewards", [])
    return [r["recipe"] for r in rewards if r.get("name") == "reward_model" and r.get("recipe")]


def user_code(recipe):
    """The .py files a grpo recipe's user rewards and tools come from (inputs: an edit reruns it)."""
    grpo = config["recipes"][recipe].get("grpo", {})
    specs = [r["name"] for r in grpo.get("rewards", [])] + grpo.get("tools", [])
    return sorted({s.rpartition(":")[0] for s in specs if ".py:" in s})


def quant_dataset(name):
    """The dataset a quantize block calibrates on: its own, else the first of the config."""
    return config["quantize"][name].get("dataset") or next(iter(config["datasets"]))


def _from_cycles():
    """Every cycle of recipes' ``from`` keys, as the list of recipe names around it."""
    cycles = []
    for start in config["recipes"]:
        chain = [start]
        while (nxt := config["recipes"][chain[-1]]["from"]) in config["recipes"]:
            if nxt in chain:
                cycle = chain[chain.index(nxt):]
                if not any(set(cycle) == set(c) for c in cycles):
                    cycles.append(cycle)
                break
            chain.append(nxt)
    return cycles


def _data_problems(name, recipe):
    """A recipe whose datasets give no rows of the kind its stage trains on."""
    need = STAGES[recipe["stage"]].rows
    wants = {"text": "format: text", "chat": "format: messages, alpaca or sharegpt",
             "preference": "format: preference", "kto": "format: kto"}[need]
    for dataset in recipe_datasets(name):
        block = config["datasets"].get(dataset)
        if block is not None and need not in kinds(block):
            yield (f"recipes.{name}.dataset: stage {recipe['stage']!r} trains on {need} rows, but dataset "
                   f"{dataset!r} has format {block['format']!r}, which gives none: use a dataset with {wants}")


def _model_problems(name, model):
    """Tiny-model sizes that cannot build (checked here, not when the model step runs), and a tiny
    text model asked to train on or answer about the synthetic images."""
    if model["source"] != "tiny":
        return
    if model["architecture"] not in ("qwen2_vl", "qwen2_5_vl"):
        for dataset, block in config["datasets"].items():
            if block["source"] == "synthetic" and block["task"] == "shapes":
                yield (f"models.{name}.architecture: {model['architecture']} has no vision tower, but dataset "
                       f"{dataset!r} (task: shapes) has images: use architecture qwen2_vl or qwen2_5_vl")
    heads, kv, hidden = (model.get(k) for k in ("num_attention_heads", "num_key_value_heads", "hidden_size"))
    if heads and kv and heads % kv:
        yield (f"models.{name}.num_key_value_heads: {kv} does not divide num_attention_heads {heads}: "
               "use a divisor of it (e.g. 1, or num_attention_heads itself)")
    if heads and hidden and hidden % heads:
        yield (f"models.{name}.hidden_size: {hidden} is not a multiple of num_attention_heads {heads}")


def _check_references():
    """Fail before any job if a name points at nothing, or a block cannot work with the one it
    names (stage vs dataset format, tiny-model sizes, from cycles); say which key to fix."""
    problems = []
    for name, model in config["models"].items():
        problems += _model_problems(name, model)
    for name, recipe in config["recipes"].items():
        for dataset in recipe_datasets(name):
            if dataset not in config["datasets"]:
                problems.append(f"recipes.{name}.dataset: {dataset!r} is not a key of datasets")
        problems += _data_problems(name, recipe)
        for stage in STAGES:
            if stage in recipe and stage != recipe["stage"]:
                problems.append(f"recipes.{name}.{stage}: a {stage}: block in a stage {recipe['stage']!r} recipe "
                                f"would do nothing: move its keys into a `{recipe['stage']}:` block (keys: "
                                "docs/align.md) or drop it")
        if recipe["from"] != "base" and recipe["from"] not in config["recipes"]:
            problems.append(f"recipes.{name}.from: {recipe['from']!r} is neither 'base' nor a recipe")
        for rm in reward_models(name):
            if config["recipes"].get(rm, {}).get("stage") != "rm":
                problems.append(f"recipes.{name}.grpo.rewards: recipe {rm!r} is not an rm recipe")
    for cycle in _from_cycles():
        loop = " -> ".join(f"{r} (recipes.{r}.from)" for r in cycle) + f" -> {cycle[0]}"
        problems.append(f"recipes.{cycle[0]}.from: a cycle: {loop}; one of these recipes must start from "
                        "base or from a recipe outside the cycle")
    for name, quant in config.get("quantize", {}).items():
        if quant.get("dataset") and quant["dataset"] not in config["datasets"]:
            problems.append(f"quantize.{name}.dataset: {quant['dataset']!r} is not a key of datasets")
        elif METHODS[quant["method"]].calibrated:
            dataset = quant_dataset(name)
            if "chat" not in kinds(config["datasets"][dataset]):
                problems.append(f"quantize.{name}.dataset: {quant['method']} calibrates on chat rows, but dataset "
                                f"{dataset!r} has format {config['datasets'][dataset]['format']!r}: name a dataset "
                                "with format messages, alpaca or sharegpt")
    for name, bench in config["benches"].items():
        data = config["datasets"].get(bench["dataset"])
        reads_split = bench["engine"] == "transformers" or not (bench.get("benchmark") or bench.get("general_qa"))
        if data is None:
            problems.append(f"benches.{name}.dataset: {bench['dataset']!r} is not a key of datasets")
        elif reads_split and "chat" not in kinds(data):
            problems.append(f"benches.{name}.dataset: {bench['dataset']!r} has format {data['format']!r}, so its "
                            f"{bench['split']} split has no chat rows to score: bench a dataset with format "
                            "messages, alpaca or sharegpt")
        elif (reads_split and bench["split"] == "test" and data["source"] != "synthetic"
              and not data.get("test_path") and data["test_size"] == 0):
            problems.append(f"benches.{name}: dataset {bench['dataset']!r} has test_size 0 and no test_path, "
                            "so its test split is empty: give the dataset a test_path or test_size, or "
                            "bench another dataset")
    for model in config["evaluation"].get("models", []):
        if model not in config["models"]:
            problems.append(f"evaluation.models: {model!r} is not a key of models")
    for bench in config["evaluation"]["benches"]:
        if bench not in config["benches"]:
            problems.append(f"evaluation.benches: {bench!r} is not a key of benches")
    for key, variants in (("evaluation.variants", config["evaluation"]["variants"]),
                          ("serving.variants", config.get("serving", {}).get("variants", []))):
        for variant in variants:
            stem, _, quant = variant.partition("/")
            if stem != "base" and stem not in config["recipes"]:
                problems.append(f"{key}: {variant!r}: {stem!r} is neither 'base' nor a recipe")
            if quant and quant not in config.get("quantize", {}):
                problems.append(f"{key}: {variant!r}: {quant!r} is not a key of quantize")
    if problems:
        raise WorkflowError("config.yaml has problems:\n  " + "\n  ".join(problems))


_check_references()
