"""Where the transformers serving engine's time per output token goes (issue 13: the rest study's
serving benchmark measured 81.8 ms TPOT on an H200 for Qwen2.5-0.5B's shape, far above a forward).

One model folder, greedy decoding of ``--tokens`` tokens after a short prompt, each row a layer of
what the product adds on top of a plain ``generate``:

| row | what runs |
|---|---|
| ``generate`` | ``model.generate`` (the baseline) |
| ``generate+criteria`` | the same with the engine's cancel check (a Python stopping criterion) |
| ``generate+streamer`` | the same with a streamer that hands token lists to a queue (in this thread) |
| ``generate in a thread`` | ``generate`` in a worker thread that this one joins |
| ``generate+streamer in a thread`` | the same with the streamer, its queue consumed here (the engine's pattern until 2026-12-06) |
| ``generate in a thread, 1 intra-op thread`` | a fresh worker thread that calls ``torch.set_num_threads(1)`` first |
| ``generate in a long-lived thread`` | one worker thread for all runs (the engine's ``_run_jobs``), each run handed to it and waited for |
| ``engine`` | ``snaketune.serve.TransformersEngine.generate``: generate in the engine's long-lived worker thread, tokens consumed here |
| ``served`` | ``python -m snaketune.serving_bench`` (the rule's command): the OpenAI server in its own process, streamed over HTTP at concurrency 1 |

Each in-process row is the median of ``--reps`` runs after one warm-up. ``--profile`` adds a
torch.profiler table of one engine run (top CPU and CUDA ops) to the JSON.

    PYTHONPATH=scripts python3 benchmarks/serve_decode.py --model DIR [--tokens 64] [--reps 5] \
        [--profile] --out benchmarks/results/<date>-<device>-serve-decode

``--model`` may be ``q05``: a random-init model of Qwen2.5-0.5B's shape is built (snaketune's
tiny builder, 151,936-row vocabulary, bf16) under ``--work``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

Q05 = {"source": "tiny", "architecture": "qwen2", "padded_vocab_size": 151936, "dtype": "bf16", "hidden_size": 896,
       "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
       "tie_word_embeddings": True, "seed": 0}


def model_folder(spec: str, work: Path) -> Path:
    if spec != "q05":
        return Path(spec)
    from snaketune.model import fetch
    from snaketune.schema import resolve

    out = work / "q05"
    if not (out / "config.json").is_file():
        fetch(resolve("models", Q05), out)
    return out


def timed(fn, reps: int) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def in_process_rows(folder: Path, tokens: int, reps: int, profile: bool) -> tuple[list[dict], dict | None]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from snaketune.serve import TransformersEngine, _QueueStreamer, _run_jobs

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(1)  # as the served engine runs (serve.py: SNAKETUNE_THREADS, default 1)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok.apply_chat_template([{"role": "user", "content": "Count from one to one hundred."}],
                                  add_generation_prompt=True)
    if not isinstance(ids, list):
        ids = ids["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", device_map=device).eval()
    inp = torch.tensor([ids], device=device)
    greedy = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=tok.pad_token_id)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def plain(**extra):
        def run():
            with torch.no_grad():
                model.generate(inp, attention_mask=torch.ones_like(inp), **greedy, **extra)
            sync()
        return run

    never = threading.Event()

    def cancel(input_ids, scores, **_):
        return torch.full((input_ids.shape[0],), never.is_set(), dtype=torch.bool, device=input_ids.device)

    def in_thread(fn):  # the engine's pattern: generate in a worker thread, this one waits
        def run():
            worker = threading.Thread(target=fn)
            worker.start()
            worker.join()
        return run

    def one_intra_op_thread(fn):  # torch's count is process-wide: restored for the rows after this one
        def run():
            before = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                fn()
            finally:
                torch.set_num_threads(before)
        return run

    jobs = queue.Queue()
    threading.Thread(target=_run_jobs, args=(jobs,), daemon=True).start()

    def in_long_lived_thread(fn):
        def run():
            done = threading.Event()
            jobs.put(lambda: (fn(), done.set()))
            done.wait()
        return run

    def streamed_from_thread():  # ... and consumes the streamer's queue meanwhile, as the engine does
        q = queue.Queue()
        worker = threading.Thread(target=plain(streamer=_QueueStreamer(q, len(ids))))
        worker.start()
        while q.get() is not None:
            pass
        worker.join()

    rows = [("generate", plain()), ("generate+criteria", plain(stopping_criteria=[cancel])),
            ("generate+streamer", lambda: plain(streamer=_QueueStreamer(queue.Queue(), len(ids)))()),
            ("generate in a thread", in_thread(plain())), ("generate+streamer in a thread", streamed_from_thread),
            ("generate in a thread, 1 intra-op thread", in_thread(one_intra_op_thread(plain()))),
            ("generate in a long-lived thread", in_long_lived_thread(plain()))]
    out = [{"row": name, "s_per_token": timed(fn, reps) / tokens} for name, fn in rows]
    model.cpu()  # the engine loads its own copy
    engine = TransformersEngine(str(folder), {"device": device})
    request = {"max_tokens": tokens, "ignore_eos": True, "temperature": 0}

    def engine_run():
        n = sum(len(new) for new in engine.generate(ids, request))
        assert n == tokens, n
        sync()

    out.append({"row": "engine", "s_per_token": timed(engine_run, reps) / tokens})
    table = None
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with torch_profile(activities=acts) as prof:
            engine_run()
        table = {"cpu": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)}
        if device == "cuda":
            table["cuda"] = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25)
    return out, table


def served_row(folder: Path, tokens: int, work: Path) -> dict:
    """The serving benchmark's own command on this model: TPOT p50 at concurrency 1."""
    out = work / "served.json"
    params = {"engine": "transformers", "concurrency": [1], "requests": 8, "prompt_tokens": 32,
              "output_tokens": tokens, "warmup": 2}
    subprocess.run([sys.executable, "-m", "snaketune.serving_bench", "--model", str(folder), "--params",
                    json.dumps(params), "--out", str(out)], check=True,
                   env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "scripts"),
                                                                            os.environ.get("PYTHONPATH")]))})
    level = json.loads(out.read_text())["levels"][0]
    return {"row": "served", "s_per_token": level["tpot_ms"]["p50"] / 1000, "ttft_ms_p50": level["ttft_ms"]["p50"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model folder, or q05 (built)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "serve-decode")
    ap.add_argument("--out", type=Path, required=True, help="path stem: writes .json and .md")
    args = ap.parse_args()
    import torch
    import transformers

    args.work.mkdir(parents=True, exist_ok=True)
    folder = model_folder(args.model, args.work)
    rows, table = in_process_rows(folder, args.tokens, args.reps, args.profile)
    rows.append(served_row(folder, args.tokens, args.work))
    base = rows[0]["s_per_token"]
    for r in rows:
        r["ms_per_token"] = round(1000 * r.pop("s_per_token"), 2)
        r["vs_generate"] = round(r["ms_per_token"] / (1000 * base), 2)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    record = {"model": str(args.model), "tokens": args.tokens, "reps": args.reps, "device": device,
              "torch": torch.__version__, "transformers": transformers.__version__, "rows": rows,
              "profile": table}
    md = [f"# Serving decode, {args.model} on {device} (torch {torch.__version__}, transformers "
          f"{transformers.__version__}), {args.tokens} greedy tokens", "",
          "| row | ms/token | x generate |", "|---|---|---|"]
    md += [f"| {r['row']} | {r['ms_per_token']} | {r['vs_generate']} |" for r in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
