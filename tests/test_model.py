"""The model step: tiny builder, and the hub/ModelScope/local sources with the network mocked."""

import json
import sys
import types

import pytest

from snaketune import model as model_step
from snaketune.errors import SnaketuneError
from conftest import TINY


def test_tiny_model_loads_and_chats(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert model.config.model_type == "qwen2"
    text = tok.apply_chat_template([{"role": "user", "content": "What is 12+3?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|im_start|>user\nWhat is 12+3?<|im_end|>\n<|im_start|>assistant\n"
    assert [t for t in tok.tokenize("123") if t.isdigit()] == ["1", "2", "3"]  # digits split
    source = json.loads((tiny_model / "source.json").read_text())
    assert source["source"] == "tiny" and "model.safetensors" in source["files"]


def test_tiny_model_is_reproducible(tmp_path):
    model_step.fetch(TINY, tmp_path / "a")
    model_step.fetch(TINY, tmp_path / "b")
    assert model_step.hash_tree(tmp_path / "a") == model_step.hash_tree(tmp_path / "b")


def _fake_snapshot(local_dir, **_):
    from pathlib import Path

    Path(local_dir, "config.json").write_text("{}")
    Path(local_dir, "model.safetensors").write_bytes(b"weights")


def test_hf_source_resolves_revision_and_pins_the_commit(tmp_path, monkeypatch):
    import huggingface_hub

    calls = {}

    class FakeApi:
        def model_info(self, repo, revision):
            calls["info"] = (repo, revision)
            return types.SimpleNamespace(sha="c0ffee" * 6 + "abcd")

    def fake_download(repo_id, revision, local_dir, allow_patterns):
        calls["download"] = (repo_id, revision, allow_patterns)
        _fake_snapshot(local_dir)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    record = model_step.fetch({"source": "hf", "repo": "Qwen/Qwen2.5-7B-Instruct", "revision": "main"},
                              tmp_path / "m")
    assert calls["info"] == ("Qwen/Qwen2.5-7B-Instruct", "main")
    assert calls["download"][:2] == ("Qwen/Qwen2.5-7B-Instruct", "c0ffee" * 6 + "abcd")
    assert "*.safetensors" in calls["download"][2]
    assert record["revision"] == "c0ffee" * 6 + "abcd"
    assert set(record["files"]) == {"config.json", "model.safetensors"}


def test_modelscope_source(tmp_path, monkeypatch):
    seen = {}

    def fake_download(repo, revision, local_dir, allow_patterns):
        seen.update(repo=repo, revision=revision)
        _fake_snapshot(local_dir)

    monkeypatch.setitem(sys.modules, "modelscope", types.SimpleNamespace(snapshot_download=fake_download))
    record = model_step.fetch({"source": "modelscope", "repo": "qwen/Qwen2.5-7B-Instruct", "revision": "v1.0"},
                              tmp_path / "m")
    assert seen == {"repo": "qwen/Qwen2.5-7B-Instruct", "revision": "v1.0"}
    assert record["source"] == "modelscope" and (tmp_path / "m" / "source.json").is_file()


def test_modelscope_missing_package_is_advice(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "modelscope", None)
    with pytest.raises(SnaketuneError, match="pip install modelscope"):
        model_step.fetch({"source": "modelscope", "repo": "x/y"}, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_local_source_links_files(tiny_model, tmp_path):
    record = model_step.fetch({"source": "local", "path": str(tiny_model)}, tmp_path / "copy")
    assert record["files"] == {k: v for k, v in model_step.hash_tree(tiny_model).items()}


def test_local_source_without_config_is_advice(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SnaketuneError, match="no config.json"):
        model_step.fetch({"source": "local", "path": str(tmp_path / "empty")}, tmp_path / "m")


def test_model_hash_is_the_models_files_not_the_records_of_its_run(tiny_model, tmp_path):
    """Two runs that made the same weights (one of them resumed after preemption) have the same
    model_sha256: training.json and the other run records (durations) are not hashed; a changed
    file of the model is."""
    import shutil

    from snaketune.evaluate import model_hash

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tiny_model, a)
    shutil.copytree(tiny_model, b)
    (a / "training.json").write_text(json.dumps({"wall_seconds": 12.5, "resumed_from": None}))
    (b / "training.json").write_text(json.dumps({"wall_seconds": 30.1, "resumed_from": "checkpoint-100"}))
    assert model_hash(a) == model_hash(b)
    (b / "generation_config.json").write_text((b / "generation_config.json").read_text() + " ")
    assert model_hash(a) != model_hash(b)
