"""Shared fixtures: a tiny model folder and a tiny dataset folder, built once per session."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(source="tiny", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=512, seed=0)


@pytest.fixture(autouse=True)
def _isolated_tracking(tmp_path, monkeypatch):
    """Every test logs MLflow runs to its own SQLite file, never to results/. The variable
    MLFLOW_TRACKING_URI is removed again afterwards: ``mlflow.set_tracking_uri`` (called by any
    in-process step) exports it, and a later workflow run would then log there."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("SNAKETUNE_TRACKING", json.dumps({"uri": uri, "experiment": "test"}))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # recorded as absent before, so restored as absent
    monkeypatch.delenv("MLFLOW_TRACKING_URI")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from snaketune.model import fetch

    out = tmp_path_factory.mktemp("models") / "tiny"
    fetch(TINY, out)
    return out


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    from snaketune.data import prepare

    out = tmp_path_factory.mktemp("data") / "arith"
    prepare({"source": "synthetic", "max_operand": 12, "n_test": 20, "seed": 0}, out)
    return out


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def snakemake(workdir, *args, timeout=1800):
    """Run the workflow on ``workdir/config.yaml`` with the test venv's tools first on PATH."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "workflow/Snakefile"),
           "--directory", str(workdir), "--configfile", str(workdir / "config.yaml"), "--cores", "2", *args]
    env = {k: v for k, v in os.environ.items() if k not in ("SNAKETUNE_TRACKING", "MLFLOW_TRACKING_URI")}
    env["PATH"] = f"{Path(sys.executable).parent}:{os.environ['PATH']}"  # the study logs to its results/mlflow.db
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="session")
def default_study(tmp_path_factory):
    """The default study (config.yaml as it is) run once locally; shared by the tests that need a
    finished study (workflow, Slurm comparison, determinism, report, bundle). Do not modify it:
    copy it first (see ``copy_study``)."""
    work = tmp_path_factory.mktemp("default-study")
    (work / "config.yaml").write_text((ROOT / "config.yaml").read_text())
    result = snakemake(work)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    return work, result


def copy_study(src: Path, dest: Path) -> Path:
    """Copy a finished study (outputs, Snakemake metadata, mtimes) to change it safely."""
    import shutil

    shutil.copytree(src, dest, symlinks=True)
    return dest
