"""Where every artifact lies under results/, the wildcards that name it, the input functions that
find a job's inputs, and the targets of the study."""

from types import SimpleNamespace

from snaketune.data import local_files
from snaketune.files import user_files


RESULTS = "results"
CACHE = f"{RESULTS}/cache/tokenized"


def _alternatives(names):
    return "|".join(sorted(names)) or "^$"


wildcard_constraints:
    model=_alternatives(config["models"]),
    dataset=_alternatives(config["datasets"]),
    recipe=_alternatives(config["recipes"]),
    quant=_alternatives(config.get("quantize", {})),
    bench=_alternatives(config["benches"]),
    stem=_alternatives(["base", *config["recipes"]]),


def model_dir(model, stem):
    """HF model folder of a variant stem: base, or a recipe (merged when it is an adapter)."""
    return f"{RESULTS}/{model}/{stem}/model"


def rm_dir(model, recipe):
    """An rm recipe's output: a model folder (full) or a sequence-classification adapter."""
    return f"{RESULTS}/{model}/{recipe}/{'adapter' if is_adapter(recipe) else 'model'}"


def train_input(wildcards):
    recipe = config["recipes"][wildcards.recipe]
    return {
        "base": model_dir(wildcards.model, recipe["from"]),
        "data": [f"{RESULTS}/datasets/{d}" for d in recipe_datasets(wildcards.recipe)],
        "reward_models": [rm_dir(wildcards.model, r) for r in reward_models(wildcards.recipe)],
        "code": user_code(wildcards.recipe),
    }


def merge_base(wildcards):
    return model_dir(wildcards.model, config["recipes"][wildcards.recipe]["from"])


def eval_model(wildcards):
    stem, _, quant = wildcards.variant.partition("/")
    return f"{RESULTS}/{wildcards.model}/{stem}/{quant}/model" if quant else model_dir(wildcards.model, stem)


def artifact_targets():
    """The model folder of every evaluated variant (and the adapter of each adapter recipe): targets
    of `all`, so an artifact that is gone (a failed forced rerun deletes its job's output) is
    rebuilt even when the eval JSON made from it is still there."""
    models = config["evaluation"].get("models") or list(config["models"])
    targets = set()
    for m in models:
        for variant in config["evaluation"]["variants"]:
            stem = variant.partition("/")[0]
            targets.add(eval_model(SimpleNamespace(model=m, variant=variant)))
            if stem != "base" and is_adapter(stem):
                targets.add(f"{RESULTS}/{m}/{stem}/adapter")
    return sorted(targets)


def bench_data(wildcards):
    return f"{RESULTS}/datasets/{config['benches'][wildcards.bench]['dataset']}"


def quant_data(wildcards):
    return f"{RESULTS}/datasets/{quant_dataset(wildcards.quant)}"


def dataset_files(wildcards):
    """A local dataset's files (path, test_path, and the images their rows name): inputs of the data
    rule, so editing one reruns it."""
    return local_files(config["datasets"][wildcards.dataset])


def model_files(wildcards):
    """A local model folder's files or GGUF file: inputs of the fetch rule, so replacing the weights
    reruns it (a GGUF inside a Python package is pinned by its sha256 in source.json instead)."""
    block = config["models"][wildcards.model]
    return user_files(block["path"]) if block["source"] in ("local", "gguf") and block.get("path") else []


EVAL_MODULES = {"transformers": "evaluate", "evalscope": "evalscope_eval"}


def eval_targets():
    models = config["evaluation"].get("models") or list(config["models"])
    return [
        f"{RESULTS}/{m}/{v}/eval/{b}.json"
        for m in models
        for v in config["evaluation"]["variants"]
        for b in config["evaluation"]["benches"]
    ]


def serving_targets():
    serving = config.get("serving", {})
    models = config["evaluation"].get("models") or list(config["models"])
    return [
        f"{RESULTS}/{m}/{v}/serving/{serving['engine']}.json"
        for m in models
        for v in serving.get("variants", [])
    ]
