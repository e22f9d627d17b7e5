"""Determinism on CPU: two runs of the workflow in separate directories give byte-identical eval
metrics, loss curves, summary tables and weights (base model, full fine-tune, LoRA adapter, merge).

The study is config.yaml shrunk to about two minutes on two shared cores (pt 2 epochs, LoRA SFT 20
steps, variants base and sft-lora, 50 eval samples); everything else, seeds included, is the
default config (``conftest.small_config``). The first run starts in the background at collection;
the second is its re-run from its bundle by `snaketune.bundle verify` in a fresh directory
(``conftest.small_study_rerun``), which the bundle tests check too.
"""

import hashlib
import json
from pathlib import Path

import pytest

from conftest import small_config, snakemake

pytestmark = pytest.mark.slow
MODEL = "tiny-qwen2"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def eval_metrics(path: Path) -> dict:
    """An eval JSON without its wall-clock field (``seconds``), the only thing allowed to differ."""
    record = json.loads(path.read_text())
    record.pop("seconds")
    return record


@pytest.fixture(scope="module")
def two_runs(small_study, small_study_rerun):
    rerun, result = small_study_rerun
    assert (rerun / "results/summary.md").is_file(), (result.stdout + result.stderr)[-6000:]
    return small_study, rerun


def test_eval_json_metrics_are_identical(two_runs):
    a, b = two_runs
    evals = sorted(p.relative_to(a) for p in a.glob(f"results/{MODEL}/**/eval/*.json"))
    assert len(evals) == 2, evals
    for rel in evals:
        ra, rb = eval_metrics(a / rel), eval_metrics(b / rel)
        assert json.dumps(ra, sort_keys=True) == json.dumps(rb, sort_keys=True), rel
        assert len(ra["examples"]) > 0 and ra["model_sha256"] == rb["model_sha256"]
    # the summary table too, but for the serving columns (wall-clock throughput, latency)
    assert summary_cells(a) == summary_cells(b)


def summary_cells(work: Path) -> list[list[str]]:
    lines = [ln for ln in (work / "results/summary.md").read_text().splitlines() if ln.startswith("|")]
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines[:1] + lines[2:]]
    timed = {i for i, name in enumerate(rows[0]) if name.startswith(("serve", "TTFT"))}
    return [[c for i, c in enumerate(row) if i not in timed] for row in rows]


def test_weights_are_identical(two_runs):
    a, b = two_runs
    weights = sorted(p.relative_to(a) for p in a.glob(f"results/{MODEL}/**/*.safetensors"))
    names = {str(p) for p in weights}
    assert f"results/{MODEL}/sft-lora/adapter/adapter_model.safetensors" in names, names
    assert f"results/{MODEL}/pt/model/model.safetensors" in names, names
    for rel in weights:
        if "checkpoints" in rel.parts:
            continue
        assert sha256(a / rel) == sha256(b / rel), f"{rel} differs between two runs"


def test_loss_curves_are_identical(two_runs):
    a, b = two_runs
    for rel in (f"results/{MODEL}/pt/model/training.json", f"results/{MODEL}/sft-lora/adapter/training.json"):
        ta, tb = (json.loads((w / rel).read_text()) for w in (a, b))
        la = [(h["step"], h["loss"], h.get("grad_norm")) for h in ta["log_history"] if "loss" in h]
        lb = [(h["step"], h["loss"], h.get("grad_norm")) for h in tb["log_history"] if "loss" in h]
        assert la and la == lb, rel
        assert ta["train_loss"] == tb["train_loss"] and ta["tokens"] == tb["tokens"]


def test_seeds_and_switch_reach_the_steps(two_runs):
    """Every seeded step gets the config's seed; training asks for deterministic algorithms on CPU."""
    a, _ = two_runs
    log = (a / f"results/{MODEL}/sft-lora/adapter/training.json")
    assert log.is_file()
    from snaketune.schema import resolve
    from snaketune.training import trainer_args

    def determinism(cuda, **keys):
        recipe = resolve("recipes", {"stage": "sft", "train_type": "lora", "dataset": "d", **keys})
        return trainer_args(recipe, a / "ckpt", cuda, "fp32", 10)["full_determinism"]

    assert determinism(False) and not determinism(True) and determinism(True, deterministic=True)
    dry = snakemake(a, "-n", "--forceall", "-p", "bundle")
    assert dry.returncode == 0, dry.stderr[-3000:]
    config = small_config()
    shells = [ln for ln in dry.stdout.splitlines() if "python -m snaketune." in ln and "--params" in ln]
    seeded = [ln for ln in shells if any(f"snaketune.{s} " in ln for s in ("model", "data", "train"))]
    assert len(seeded) >= 4, shells
    for line in seeded:
        assert f'"seed": {config["seed"]}' in line, line
