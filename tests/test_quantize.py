"""Quantize step: every method end to end on a tiny random-init Qwen2, reloaded with transformers
on CPU, with logits compared to the unquantized model.

Tolerance (stated per method in ``TOLERANCE``): over three chat prompts, the cosine similarity of
the full logit tensors to the unquantized model's and the fraction of positions whose top-1 token
agrees. A random-init model has nearly flat logits, so top-1 agreement is a strict test there;
the numbers measured on this machine are in docs/quantize.md.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("llmcompressor")
torch.set_num_threads(1)

from snaketune.errors import SnaketuneError  # noqa: E402
from snaketune.model import fetch  # noqa: E402
from snaketune.quantize import quantize  # noqa: E402

# hidden 128 / intermediate 512: every Linear input width is a multiple of 64 and 128
DIMS = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}
# method -> (params, min cosine of logits, min top-1 agreement)
TOLERANCE = {
    "fp8": ({"method": "fp8"}, 0.99, 0.9),
    "gptq": ({"method": "gptq", "group_size": 64}, 0.98, 0.8),
    "awq": ({"method": "awq", "group_size": 64}, 0.97, 0.8),
    "bnb-nf4": ({"method": "bnb-nf4"}, 0.97, 0.8),
    "bnb-int8": ({"method": "bnb-int8"}, 0.995, 0.9),
}
CAL = {"samples": 16, "seed": 0, "max_length": 64}
PROMPTS = ["What is 12+30?", "the water is", "Tell me about the number 7"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    fetch({"source": "tiny", **DIMS}, root / "base")
    rng = random.Random(0)
    (root / "data").mkdir()
    with open(root / "data" / "train.jsonl", "w") as fh:
        for _ in range(40):
            a, b = rng.randrange(100), rng.randrange(100)
            fh.write(json.dumps({"messages": [{"role": "user", "content": f"What is {a}+{b}?"},
                                              {"role": "assistant", "content": str(a + b)}]}) + "\n")
    return root


def encoded(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return tok, [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True) for p in PROMPTS]


def logits_of(model_dir, batches):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, device_map="cpu")
    with torch.no_grad():
        return model, [model(**b).logits.float() for b in batches]


@pytest.fixture(scope="module")
def reference(workdir):
    tok, batches = encoded(workdir / "base")
    _, ref = logits_of(workdir / "base", batches)
    return tok, batches, ref


@pytest.mark.parametrize("method", list(TOLERANCE))
def test_quantize_reload_and_compare(method, workdir, reference):
    params, min_cos, min_top1 = TOLERANCE[method]
    out = workdir / f"q-{method}"
    record = quantize(str(workdir / "base"), str(workdir / "data"), {**params, "calibration": CAL}, out)

    meta = json.loads((out / "quantization.json").read_text())
    assert meta == record
    assert meta["method"] == method and meta["scheme"] and meta["library_version"]
    assert 0 < meta["size_bytes"] < meta["source_size_bytes"]
    if method in ("gptq", "awq"):
        assert len(meta["calibration"]["sha256"]) == 64
        assert meta["format"] == "compressed-tensors"
    assert not list(workdir.glob(f".q-{method}.partial-*")), "atomic_dir left a partial folder"

    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" in cfg

    tok, batches, ref = reference
    model, got = logits_of(out, batches)
    cos = min(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
              for a, b in zip(ref, got))
    top1 = sum((a.argmax(-1) == b.argmax(-1)).float().mean().item() for a, b in zip(ref, got)) / len(ref)
    assert cos >= min_cos, f"{method}: logits cosine {cos:.4f} < {min_cos}"
    assert top1 >= min_top1, f"{method}: top-1 agreement {top1:.3f} < {min_top1}"
    with torch.no_grad():
        gen = model.generate(**batches[0], max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == batches[0]["input_ids"].shape[1] + 4 or gen[0, -1].item() == tok.eos_token_id


def test_calibration_hash_is_deterministic(workdir):
    from transformers import AutoTokenizer

    from snaketune.quantize import calibration_rows, calibration_sha256

    tok = AutoTokenizer.from_pretrained(workdir / "base")
    render = lambda rows: [tok.apply_chat_template(r["messages"], tokenize=False) for r in rows]  # noqa: E731
    a = render(calibration_rows(workdir / "data", tok, 8, 0))
    b = render(calibration_rows(workdir / "data", tok, 8, 0))
    c = render(calibration_rows(workdir / "data", tok, 8, 1))
    assert a == b and a != c
    assert a[0].startswith("<|im_start|>user\n")
    assert calibration_sha256(a, 64) == calibration_sha256(b, 64) != calibration_sha256(c, 64)


@pytest.mark.skipif(torch.accelerator.is_available(), reason="the workaround is only active without an accelerator")
def test_awq_pin_memory_workaround():
    """llm-compressor's cache pin_memory raises on CPU-only torch; inside the guard it is a no-op
    and the original method is restored afterwards."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    from snaketune.quantize import cpu_safe_pin_memory

    cache = IntermediatesCache.from_dataloader([{"x": torch.ones(3)}])
    original = IntermediatesCache.pin_memory
    with pytest.raises(RuntimeError, match="accelerator"):
        cache.pin_memory(0)
    with cpu_safe_pin_memory() as active:
        assert active
        cache.pin_memory(0)
        assert torch.equal(cache.fetch(0)["x"], torch.ones(3))
    assert IntermediatesCache.pin_memory is original


def test_group_size_must_divide_widths(tmp_path, workdir):
    fetch({"source": "tiny", "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 1,
           "num_attention_heads": 4, "num_key_value_heads": 2}, tmp_path / "tiny64")
    with pytest.raises(SnaketuneError, match="group_size 128"):
        quantize(str(tmp_path / "tiny64"), str(workdir / "data"),
                 {"method": "gptq", "group_size": 128, "calibration": CAL}, tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_bnb_nf4_on_cpu_names_the_layers_its_kernels_cannot_run(tmp_path):
    """Widths of 96 (not a multiple of 64) quantized fine and then failed at the first generated
    token in bitsandbytes' CPU path; now quantize says so, naming the layers."""
    fetch({"source": "tiny", "hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 1,
           "num_attention_heads": 4, "num_key_value_heads": 2}, tmp_path / "tiny96")
    with pytest.raises(SnaketuneError, match=r"multiple of 64; \d+ are not: model\.layers\.0\.self_attn\.q_proj \(96\)"):
        quantize(str(tmp_path / "tiny96"), None, {"method": "bnb-nf4"}, tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_unknown_method(tmp_path, workdir):
    with pytest.raises(SnaketuneError, match="unknown quantize method"):
        quantize(str(workdir / "base"), str(workdir / "data"), {"method": "int3"}, tmp_path / "q")


def test_cli_fp8_logs_mlflow(tmp_path, workdir):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "scripts")}
    env.pop("SNAKETUNE_TRACKING", None)
    out = tmp_path / "fp8"
    proc = subprocess.run(
        [sys.executable, "-m", "snaketune.quantize", "--model", str(workdir / "base"), "--data",
         str(workdir / "data"), "--params", json.dumps({"method": "fp8"}), "--out", str(out), "--model-name", "tiny",
         "--variant", "sft/f8"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((out / "quantization.json").read_text())
    assert record["method"] == "fp8"
    assert {k: record[k] for k in ("model", "variant", "recipe", "quantize")} == {  # as the quantize rule names it
        "model": "tiny", "variant": "sft/f8", "recipe": "sft", "quantize": "f8"}
    assert (tmp_path / "mlflow.db").exists()

    bad = subprocess.run(
        [sys.executable, "-m", "snaketune.quantize", "--model", str(workdir / "base"), "--params",
         json.dumps({"method": "gptq"}), "--out", str(tmp_path / "g")],
        env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "needs calibration data" in bad.stderr
