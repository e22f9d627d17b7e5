"""Shared fixtures: a tiny model folder and a tiny dataset folder, built once per session."""

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(source="tiny", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=512, seed=0)


@pytest.fixture(autouse=True)
def _isolated_tracking(tmp_path, monkeypatch):
    """Every test logs MLflow runs to its own SQLite file, never to results/."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("SNAKETUNE_TRACKING", json.dumps({"uri": uri, "experiment": "test"}))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


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
