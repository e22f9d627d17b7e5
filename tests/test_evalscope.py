"""EvalScope evaluation: a local checkpoint (eval_type llm_ckpt) and the same model served over the
OpenAI API (transformers engine; vLLM when its venv exists) give the same greedy predictions and
the same scores.

The model is a tiny random-init Qwen2 with untied, scaled-up output embeddings, so its greedy
outputs differ from prompt to prompt and have clear logit margins. Half of the references are set
to the model's own greedy output (computed here with plain transformers), so exact match is 0.5
rather than a trivial 0.

Needs EvalScope's venv (``bash ci/evalscope.sh``; path overridable with
``SNAKETUNE_EVALSCOPE_PYTHON``); skipped without it unless ``SNAKETUNE_REQUIRE_EVALSCOPE=1``.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from snaketune.errors import SnaketuneError  # noqa: E402
from snaketune.evalscope_eval import evaluate  # noqa: E402
from snaketune.model import fetch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EVALSCOPE_PYTHON = Path(os.environ.get("SNAKETUNE_EVALSCOPE_PYTHON", ROOT / ".venv-evalscope" / "bin" / "python"))
VLLM_PYTHON = Path(os.environ.get("SNAKETUNE_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
N, MAX_NEW = 8, 8


def need(path: Path, flag: str, how: str):
    if not path.exists():
        if os.environ.get(flag) == "1":
            pytest.fail(f"{path} missing: {how}")
        pytest.skip(f"{path} missing ({how})")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    need(EVALSCOPE_PYTHON, "SNAKETUNE_REQUIRE_EVALSCOPE", "bash ci/evalscope.sh")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("evalscope")
    model_dir = root / "model"
    fetch({"source": "tiny", "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False, "seed": 1}, model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)

    rng = random.Random(3)
    (root / "data").mkdir()
    greedy = []
    with open(root / "data" / "test.jsonl", "w") as fh:
        for i in range(N):
            a, b = rng.randrange(50), rng.randrange(50)
            msgs = [{"role": "user", "content": f"What is {a}+{b}?"}]
            enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=MAX_NEW, do_sample=False)
            pred = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            greedy.append(pred)
            ref = pred if i % 2 == 0 else str(a + b)
            fh.write(json.dumps({"messages": msgs + [{"role": "assistant", "content": ref}]}) + "\n")
    return root, model_dir, greedy


def run(setup, **params):
    root, model_dir, _ = setup
    return evaluate(str(model_dir), str(root / "data"),
                    {"name": "arith", "max_new_tokens": MAX_NEW, "python": str(EVALSCOPE_PYTHON), **params})


def norm(text):
    # vLLM's incremental detokenizer drops a trailing incomplete UTF-8 sequence ("\ufffd");
    # a full decode keeps it. That is detokenization, not the model.
    return (text or "").rstrip("\ufffd")


@pytest.fixture(scope="module")
def local(setup):
    return run(setup, via="local")


def test_local_checkpoint(setup, local):
    _, _, greedy = setup
    assert local["engine"] == "evalscope" and local["via"] == "local" and local["evalscope_version"] == "1.14.0"
    assert local["n"] == N
    assert [p["prediction"] for p in local["predictions"]] == greedy  # EvalScope == plain transformers
    assert local["metric"] == "exact_match" and local["score"] == 0.5
    assert any(k.startswith("evalscope:general_qa/rouge") for k in local["metrics"])


def test_served_transformers_agrees_with_local(setup, local):
    served = run(setup, via="server", serve={"engine": "transformers"})
    assert served["via"] == "server" and served["serve_engine"] == "transformers"
    assert [p["prediction"] for p in served["predictions"]] == [p["prediction"] for p in local["predictions"]]
    assert served["metrics"] == local["metrics"]


def test_served_vllm_agrees_with_local(setup, local):
    need(VLLM_PYTHON, "SNAKETUNE_REQUIRE_VLLM", "bash ci/vllm-cpu.sh")
    # --dtype float32: vLLM otherwise downcasts a float32 checkpoint to bf16, which flips greedy
    # choices on a random model
    served = run(setup, via="server", serve={
        "engine": "vllm", "ready_timeout_s": 300,
        "vllm": {"command": [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server"],
                 "args": ["--enforce-eager", "--max-model-len", "1024", "--dtype", "float32"]}})
    assert [norm(p["prediction"]) for p in served["predictions"]] == [norm(p["prediction"]) for p in local["predictions"]]
    assert served["score"] == local["score"] == 0.5


def test_general_qa_folder_query_response(setup, tmp_path):
    root, model_dir, greedy = setup
    qa = tmp_path / "qa"
    qa.mkdir()
    rows = [{"query": "What is 1+1?", "response": "2"}, {"query": "What is 2+2?", "response": "4"}]
    (qa / "mini.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rec = evaluate(str(model_dir), None, {"name": "mini", "general_qa": str(qa), "max_new_tokens": 4,
                                          "python": str(EVALSCOPE_PYTHON), "metric": "contains"})
    assert rec["n"] == 2 and rec["metric"] == "contains"
    assert [p["prompt"] for p in rec["predictions"]] == ["What is 1+1?", "What is 2+2?"]


def test_missing_evalscope_venv_is_a_user_error(setup):
    root, model_dir, _ = setup
    with pytest.raises(SnaketuneError):
        evaluate(str(model_dir), str(root / "data"), {"python": "/nonexistent/python", "via": "local"})
