"""The schema is the one source of config keys and defaults (issue 14): every key a step reads from a
config block is a schema key, every key of a step's block is read by some code (a step or a rule),
and no step gives a key that has a schema default a default of its own (``.get(key, default)``)."""

import ast
import re
from pathlib import Path

from snaketune.align import GRPO_KEYS
from snaketune.registry import STAGES
from snaketune.schema import block_schema, resolve

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "scripts" / "snaketune"

# (module, variable) -> the config block that variable holds in that module (snaketune.schema.block_schema)
BLOCKS = {
    ("train", "recipe"): "recipes", ("training", "recipe"): "recipes", ("align", "recipe"): "recipes",
    ("kernels", "recipe"): "recipes",
    ("vision", "recipe"): "recipes",
    ("training", "lora"): "recipes.lora", ("align", "lora"): "recipes.lora",
    ("training", "q"): "recipes.quantization", ("training", "spec"): "recipes.freeze",
    ("training", "dist"): "recipes.distributed", ("align", "g"): "recipes.grpo", ("align", "grpo"): "recipes.grpo",
    ("model", "params"): "models", ("data", "params"): "datasets", ("quantize", "params"): "quantize",
    ("quantize", "cal"): "quantize.calibration",
    ("evaluate", "params"): "benches", ("evalscope_eval", "params"): "benches",
    ("serving_bench", "cfg"): "serving", ("serve", "vcfg"): "serving.vllm",
}
# Reads that count as reads of a block but are not checked against it: the serve step's params are the
# serving block when serving_bench starts it, but also the `snaketune.serve` command line's (host, port, ...)
# and a bench's free-form `serve:` block.
ALSO_READ = {("serve", "params"): "serving"}
# Keys a step reads that are no config keys: a rule adds them to the block it passes.
ADDED_BY_RULES = {"benches.name": "evaluate.smk: the bench's key (the eval record's bench)"}
# Keys of the steps' blocks that no step reads in Python, each with who reads it.
READ_ELSEWHERE = {
    "recipes.from": "paths.smk: the model a recipe starts from (train_input, merge_base)",
    "recipes.dataset": "config.smk: the dataset folders a recipe trains on (recipe_datasets)",
    "recipes.resources": "jobs.smk: job_resources; likewise models/quantize/benches.resources",
    "models.resources": "jobs.smk: job_resources",
    "quantize.resources": "jobs.smk: job_resources",
    "benches.resources": "jobs.smk: job_resources",
    "benches.engine": "evaluate.smk: which module evaluates (EVAL_MODULES)",
    "benches.dataset": "paths.smk: the dataset folder a bench reads (bench_data)",
    "quantize.dataset": "config.smk: the calibration dataset folder (quant_dataset)",
    "serving.variants": "paths.smk: serving_targets",
}
# the align stages' own blocks (recipes.dpo, ..., recipes.grpo)
METHOD_BLOCKS = [stage for stage in STAGES if stage in block_schema("recipes")["properties"]]
SECTIONS = ["models", "datasets", "recipes", "recipes.lora", "recipes.quantization", "recipes.freeze",
            "recipes.distributed", *(f"recipes.{stage}" for stage in METHOD_BLOCKS), "quantize",
            "quantize.calibration", "benches", "serving", "serving.vllm"]


def _chain(node):
    """(variable, [(key, the call if it gives a default), ...]) of ``var["a"]["b"]``,
    ``var.get("a", {}).get("b")`` or ``var.pop("a")``."""
    keys = []
    while True:
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
            keys.append((node.slice.value, None))
            node = node.value
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("get", "pop") and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            keys.append((node.args[0].value, node if len(node.args) > 1 or node.keywords else None))
            node = node.func.value
        else:
            break
    return (node.id, keys[::-1]) if isinstance(node, ast.Name) and keys else (None, [])


def _constants(statements):
    """Names assigned a tuple/list of strings or a dict literal (its keys) by these statements."""
    consts = {}
    for node in statements:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            value = node.value
            if isinstance(value, (ast.Tuple, ast.List)) and all(isinstance(e, ast.Constant) for e in value.elts):
                consts[node.targets[0].id] = [e.value for e in value.elts]
            elif isinstance(value, ast.Dict) and all(isinstance(k, ast.Constant) for k in value.keys):
                consts[node.targets[0].id] = [k.value for k in value.keys]
    return consts


def _loop_keys(func, module_consts):
    """Names a function binds to string constants by ``for k in ("a", "b")`` (loops and comprehensions),
    by loops over a tuple of strings or over a dict literal's keys: what ``var[k]`` may read there."""
    consts = {**module_consts, **_constants(ast.walk(func))}
    bound = {}
    for node in ast.walk(func):
        if isinstance(node, (ast.For, ast.comprehension)) and isinstance(node.target, ast.Name):
            it = node.iter
            if isinstance(it, (ast.Tuple, ast.List)) and all(isinstance(e, ast.Constant) for e in it.elts):
                bound.setdefault(node.target.id, []).extend(e.value for e in it.elts)
            elif isinstance(it, ast.Name) and it.id in consts:
                bound.setdefault(node.target.id, []).extend(consts[it.id])
    return bound


def reads():
    """Every read of a config block variable in the package: (module, variable, [key, ...], line, .get node)."""
    out = set()
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            var, keys = _chain(node)
            if var:
                for i in range(len(keys)):
                    out.add((path.stem, var, tuple(k for k, _ in keys[:i + 1]), node.lineno, keys[i][1]))
        module_consts = _constants(tree.body)
        for func in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]:
            loops = _loop_keys(func, module_consts)
            for node in ast.walk(func):
                if (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name)
                        and isinstance(node.slice, ast.Name) and node.slice.id in loops):
                    out |= {(path.stem, node.value.id, (k,), node.lineno, None) for k in loops[node.slice.id]}
    return sorted(out, key=lambda r: (r[0], r[3], r[2]))


def _walk(section: str, keys: list[str]):
    """The schema node of ``keys`` below ``section``; None where a key is not defined, "free" below a
    free-form object (no properties of its own)."""
    node = block_schema(section)
    for key in keys:
        props = node.get("properties")
        if props is None:
            return "free"
        if key not in props:
            return None
        node = props[key]
        if node.get("type") == "array" and isinstance(node.get("items"), dict):
            node = node["items"]
    return node


def _block_reads():
    return [(BLOCKS[(m, v)], list(keys), f"scripts/snaketune/{m}.py:{line}", get)
            for m, v, keys, line, get in reads() if (m, v) in BLOCKS]


def test_every_key_a_step_reads_is_a_schema_key():
    unknown = [f"{where}: {section}.{'.'.join(keys)}" for section, keys, where, _ in _block_reads()
               if _walk(section, keys) is None and f"{section}.{'.'.join(keys)}" not in ADDED_BY_RULES]
    assert not unknown, "keys read but not in workflow/schemas/config.schema.yaml (add them there, or stop reading them):\n" + "\n".join(unknown)


def test_no_step_defaults_a_key_the_schema_defaults():
    twice = []
    for section, keys, where, get in _block_reads():
        node = _walk(section, keys)
        if get is not None and isinstance(node, dict) and "default" in node:
            twice.append(f"{where}: {section}.{'.'.join(keys)} (schema default {node['default']!r})")
    assert not twice, ("a second default beside the schema's: read block[key] (steps resolve their block with "
                       "snaketune.schema.resolve):\n" + "\n".join(twice))


def _smk_names():
    """The keys the rules read (``["key"]`` or ``.get("key"``) in the Snakefile and rules/*.smk."""
    text = "\n".join(p.read_text() for p in (ROOT / "workflow").rglob("*.smk"))
    text += (ROOT / "workflow" / "Snakefile").read_text()
    return {a or b for a, b in re.findall(r"""\[["'](\w+)["']\]|\.get\(["'](\w+)["']""", text)}


def test_keys_allowed_as_read_by_the_rules_are_read_there():
    gone = [name for name in READ_ELSEWHERE if name.rpartition(".")[2] not in _smk_names()]
    assert not gone, f"READ_ELSEWHERE names keys no rule reads any more: {gone}"


def test_every_key_of_a_step_block_is_read():
    read = {".".join([section, *keys]) for section, keys, _, _ in _block_reads()}
    read |= {".".join([ALSO_READ[(m, v)], *keys]) for m, v, keys, _, _ in reads() if (m, v) in ALSO_READ}
    # a stage's block, read by align.method_args as recipe.get(stage), is passed on to its trl config as
    # it is (grpo: GRPO_KEYS)
    read |= {f"recipes.{stage}" for stage in METHOD_BLOCKS}
    read |= {f"recipes.{stage}.{key}" for stage in METHOD_BLOCKS if stage != "grpo"
             for key in block_schema(f"recipes.{stage}")["properties"]}
    read |= {f"recipes.grpo.{key}" for key in GRPO_KEYS}
    unread = []
    for section in SECTIONS:
        for key in block_schema(section).get("properties", {}):
            name = f"{section}.{key}"
            if name not in read and name not in READ_ELSEWHERE:
                unread.append(name)
    assert not unread, "schema keys no step or rule reads (read them, or drop them from the schema):\n" + "\n".join(unread)


def test_the_walk_sees_what_it_must():
    """The checks above can fail: an undefined key, a second default and an unread key are seen."""
    tree = ast.parse('def f(recipe):\n    return recipe.get("batch_size", 8), recipe["no_such_key"]\n')
    chains = [_chain(n) for n in ast.walk(tree)]
    found = {(v, tuple(k for k, _ in keys)) for v, keys in chains if v}
    assert ("recipe", ("batch_size",)) in found and ("recipe", ("no_such_key",)) in found
    assert _walk("recipes", ["no_such_key"]) is None and _walk("recipes", ["batch_size"])["default"] == 8
    assert _walk("recipes", ["trl_args", "anything"]) == "free"


def test_resolve_fills_the_defaults_the_workflow_fills():
    """snaketune.schema.resolve gives a step's partial block the defaults the workflow's validate fills
    (learning_rate by train_type, nested blocks, list items), without changing what is set."""
    import copy

    from snakemake.utils import validate

    recipe = {"stage": "grpo", "train_type": "full", "dataset": "d", "lora": {"r": 4}, "grpo": {"rewards": [{"name": "format"}]}}
    config = {"study": "s", "models": {"m": {"source": "tiny"}}, "datasets": {"d": {"source": "synthetic"}},
              "recipes": {"r": copy.deepcopy(recipe)}, "benches": {"b": {"dataset": "d"}},
              "evaluation": {"variants": ["base"], "benches": ["b"]}}
    validate(config, str(ROOT / "workflow/schemas/config.schema.yaml"), set_default=True)
    resolved = resolve("recipes", recipe)
    assert resolved == config["recipes"]["r"]
    assert resolved["learning_rate"] == 1e-5 and resolved["lora"] == {"r": 4, "alpha": 32, "dropout": 0.0,
                                                                        "target_modules": "all-linear"}
    assert resolved["grpo"]["rewards"] == [{"name": "format", "weight": 1.0}] and resolved["grpo"]["num_generations"] == 8
    assert resolve("recipes", {"train_type": "lora"})["learning_rate"] == 1e-4
    assert recipe["lora"] == {"r": 4}  # a copy: the caller's block is left as it was
