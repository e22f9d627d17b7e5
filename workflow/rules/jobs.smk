"""How each job runs: the shell prefix (MLflow tracking, the interpreter), the params JSON and label
a rule passes its step, and its resources."""

import json
import shlex
import subprocess
import sys

from snakemake.settings.types import DeploymentMethod

from snaketune.files import folder_size


def _git_commit():
    try:
        out = subprocess.run(["git", "-C", workflow.basedir, "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


GIT_COMMIT = _git_commit()


# Where every step logs (read by snaketune.tracking); per-job tags come from each rule's params,
# run names from them and the model count (the model is named only when there are several).
# A shell prefix, not a rule param, so a new commit or study name reruns nothing.
TRACKING = json.dumps(
    {"uri": config["tracking"]["uri"], "experiment": config["study"],
     "tags": {"git.commit": GIT_COMMIT, "study": config["study"]}, "models": len(config["models"])}
)


_QUOTED = shlex.quote(TRACKING).replace("{", "{{").replace("}", "}}")


# Rules call `python`: without --use-conda that must be the interpreter Snakemake runs under (the
# venv with snaketune), also when the venv is not activated (`.venv/bin/snakemake`); with
# --use-conda the rule's env provides it, so PATH is left alone.
_USES_CONDA = DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method


_PATH = "" if _USES_CONDA else f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH; "
shell.prefix(f"{_PATH}export SNAKETUNE_TRACKING={_QUOTED}; ")


def train_spec(wildcards):
    """The recipe block for the train/align step; reward_model rewards get their rm folder path."""
    recipe = with_seed(config["recipes"][wildcards.recipe])
    if "grpo" in recipe:
        rewards = [
            {**r, "path": rm_dir(wildcards.model, r["recipe"])} if r.get("recipe") else r
            for r in recipe["grpo"].get("rewards", [])
        ]
        recipe = {**recipe, "grpo": {**recipe["grpo"], "rewards": rewards}}
    return params_json(recipe)


def with_seed(block):
    """A step's config block with the study seed filled in where it has none."""
    return {"seed": config["seed"], **block}


def params_json(block):
    return json.dumps(block, sort_keys=True)


def job_label(rule):
    """Param naming the job for MLflow tags: rule[wildcard=value,...] (stable, so no reruns)."""
    return lambda wc: f"{rule}[{','.join(f'{k}={v}' for k, v in wc.items())}]"


RESOURCE_DEFAULTS = {
    "gpu": {"gpu": 1, "nodes": 1, "mem_mb": 16000, "runtime": 120},
    "cpu": {"gpu": 0, "mem_mb": 4000, "runtime": 60},
}


def _optional_keys():
    """Resource keys some config block sets beyond the ones every job has (e.g. gpu_model)."""
    blocks = [config["resources"].get(k, {}) for k in ("gpu", "cpu")]
    blocks += list(config["resources"].get("steps", {}).values())
    for section in ("models", "recipes", "quantize", "benches"):
        blocks += [b.get("resources", {}) for b in config.get(section, {}).values()]
    return sorted({k for b in blocks for k in b} - {"gpu", "nodes", "mem_mb", "runtime", "threads"})


def job_resources(kind, rule, section=None, wildcard=None, model_input=None):
    """Per-job resources: the job's config block (``<section>.<name>.resources``) >
    ``resources.steps.<rule>`` > ``resources.<kind>`` > defaults.

    ``kind`` is "gpu" for steps that want an accelerator (train, quantize, evaluate) and "cpu"
    otherwise; ``section``/``wildcard`` name the config block of the job (e.g. recipes/recipe).
    With ``model_input`` (the input holding a model folder) and no ``mem_mb`` set for the step,
    memory is sized from the model: three times its files (weights loaded, merged copy, save
    buffers) plus 2 GB.
    """

    def resolve(wildcards, input):
        step = config["resources"].get("steps", {}).get(rule, {})
        block = config[section][wildcards[wildcard]].get("resources", {}) if section else {}
        merged = {**RESOURCE_DEFAULTS[kind], **config["resources"].get(kind, {}), **step, **block}
        if model_input and "mem_mb" not in step and "mem_mb" not in block:
            merged["mem_mb"] = max(merged["mem_mb"], int(3 * (folder_size(input[model_input]) / 1e6)) + 2000)
        if not merged["gpu"]:
            merged.pop("gpu_model", None)  # the Slurm plugin would ask for --gpus=<model>:0
        return merged

    keys = [*RESOURCE_DEFAULTS[kind], *_optional_keys()]
    return {key: (lambda wildcards, input, key=key: resolve(wildcards, input).get(key, "")) for key in keys}
