"""Step `serving_bench`: start a model server, drive load against it, write throughput/latency JSON.

The server (``params.engine``: ``transformers`` or ``vllm``, configured as for ``snaketune.serve``)
is started on 127.0.0.1 with a free port, waited for on ``/health``, and always stopped
afterwards (also on errors, Ctrl-C and SIGTERM; its whole process group is killed).

Load: for each level in ``params.concurrency``, ``params.requests`` streaming chat completions
(default 4 × concurrency) are sent with at most that many in flight by the ``openai`` package's
async client, with synthetic prompts of about ``params.prompt_tokens`` tokens and exactly
``params.output_tokens`` generated tokens (``ignore_eos``). ``params.warmup`` requests run first
and are not counted.

Output JSON (per level): requests/s, output tokens/s, TTFT (to the first streamed choice chunk),
time per output token after the first (TPOT, from the token count in the usage chunk) and
end-to-end latency p50/p90/p99 in ms, all as the client sees them (a vision-language model gets one
drawn image per request, as an ``image_url`` content part: ``images_per_request``); completed and failed request counts and the first error
messages; plus the server command, its time to ready, and whether its processes are gone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import shlex
import sys
import time
from pathlib import Path

from snaketune.atomic import write_json
from snaketune.errors import SnaketuneError, cli
from snaketune.files import record_names
from snaketune.schema import resolve
from snaketune.serve import ServerProcess, terminate_as_exit
from snaketune.tracking import peak_rss_mb
from snaketune.vision import is_vision

# what the serving keys without a schema default mean when unset; the other defaults are the schema's
UNSET = {"requests": None, "request_timeout_s": 300, "seed": 0}  # requests None: 4 x concurrency per level
CONFIG_KEYS = ("engine", "concurrency", "requests", "prompt_tokens", "output_tokens", "warmup", "request_timeout_s",
               "seed")
SCHEMA_VERSION = 1
WORDS = ("the of and to in is you that it was for on are as with they at be this from have or by one "
         "had not but what all were when we there can an your which their said if do will each about "
         "how up out them then she many some so these would other into has more two like him see time "
         "could no make than first been its who now people my made over did down only way find use may "
         "water long little very after words called just where most know answer question number").split()


def percentiles(values: list[float], ps=(50, 90, 99)) -> dict:
    """Linear-interpolated percentiles (numpy's default method) of ``values``; None if empty."""
    if not values:
        return {f"p{p}": None for p in ps} | {"mean": None}
    xs = sorted(values)
    out = {}
    for p in ps:
        k = (len(xs) - 1) * p / 100
        lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
        out[f"p{p}"] = xs[lo] + (xs[hi] - xs[lo]) * (k - lo)
    out["mean"] = sum(xs) / len(xs)
    return out


def make_prompts(tokenizer, n: int, target_tokens: int, seed: int) -> list[str]:
    """``n`` random-word prompts whose token count is close to ``target_tokens``."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        words = []
        while True:
            words.append(rng.choice(WORDS))
            if len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) >= target_tokens:
                break
        prompts.append(" ".join(words))
    return prompts


def image_prompt(prompt: str, seed: int) -> list[dict]:
    """A prompt for a vision-language model: one drawn 56x56 image (a circle, as the shapes task
    draws them) as a base64 ``image_url`` part, then the text."""
    import base64

    from snaketune.data import COLOURS, draw_shapes

    rng = random.Random(seed)
    image = draw_shapes("colour", rng.choice(sorted(COLOURS)), [(rng.randrange(28), rng.randrange(28))], 20, 56)
    url = "data:image/png;base64," + base64.b64encode(image.data).decode()
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt}]


async def one_request(client, model: str, prompt: str | list[dict], output_tokens: int, timeout: float) -> dict:
    """One streaming chat completion (``prompt``: the user turn's content, text or content parts);
    returns timings (s) and token counts, or an error."""
    start = time.perf_counter()
    first = None
    chunks = 0
    usage = None
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=output_tokens,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True, "min_tokens": output_tokens},
            timeout=timeout,
        )
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            if chunk.choices:
                # vLLM and the transformers engine send the first choice chunk (role, maybe text)
                # once the first token exists; tokens that decode to nothing (special tokens,
                # partial UTF-8) send no text, so the first *text* would overstate TTFT
                if first is None:
                    first = time.perf_counter()
                if chunk.choices[0].delta and chunk.choices[0].delta.content:
                    chunks += 1
        end = time.perf_counter()
    except Exception as e:  # counted as an error, the benchmark goes on
        return {"ok": False, "error": f"{type(e).__name__}: {e}"[:500], "latency": time.perf_counter() - start}
    out_tokens = usage.completion_tokens if usage is not None else chunks
    prompt_tokens = usage.prompt_tokens if usage is not None else None
    if first is None:
        return {"ok": False, "error": "no choices in the response stream", "latency": end - start}
    ttft = first - start
    tpot = (end - first) / (out_tokens - 1) if out_tokens > 1 else None
    return {"ok": True, "ttft": ttft, "tpot": tpot, "latency": end - start, "output_tokens": out_tokens,
            "prompt_tokens": prompt_tokens}


async def run_level(client, model: str, prompts: list[str], concurrency: int, output_tokens: int,
                    timeout: float) -> dict:
    """Send ``prompts`` with at most ``concurrency`` in flight; aggregate the results."""
    sem = asyncio.Semaphore(concurrency)

    async def bounded(p):
        async with sem:
            return await one_request(client, model, p, output_tokens, timeout)

    start = time.perf_counter()
    results = await asyncio.gather(*(bounded(p) for p in prompts))
    duration = time.perf_counter() - start
    ok = [r for r in results if r["ok"]]
    errors = [r["error"] for r in results if not r["ok"]]
    out_tokens = sum(r["output_tokens"] for r in ok)
    ms = lambda xs: {k: (None if v is None else round(v * 1000, 3)) for k, v in percentiles(xs).items()}  # noqa: E731
    prompt_counts = [r["prompt_tokens"] for r in ok if r["prompt_tokens"] is not None]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "completed": len(ok),
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:5],
        "duration_s": round(duration, 4),
        "requests_per_s": round(len(ok) / duration, 4) if duration else None,
        "output_tokens_per_s": round(out_tokens / duration, 4) if duration else None,
        "output_tokens": out_tokens,
        "mean_prompt_tokens": round(sum(prompt_counts) / len(prompt_counts), 2) if prompt_counts else None,
        "ttft_ms": ms([r["ttft"] for r in ok]),
        "tpot_ms": ms([r["tpot"] for r in ok if r["tpot"] is not None]),
        "latency_ms": ms([r["latency"] for r in ok]),
    }


async def drive(server: ServerProcess, prompts_by_level: dict, warmup: list[str], cfg: dict) -> list[dict]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=server.base_url, api_key=server.api_key or "EMPTY", max_retries=0,
                         timeout=cfg["request_timeout_s"])
    try:
        for p in warmup:
            r = await one_request(client, server.model_name, p, cfg["output_tokens"], cfg["request_timeout_s"])
            if not r["ok"]:
                raise SnaketuneError(f"warm-up request failed: {r['error']}")
        levels = []
        for c, prompts in prompts_by_level.items():
            levels.append(await run_level(client, server.model_name, prompts, c, cfg["output_tokens"],
                                          cfg["request_timeout_s"]))
        return levels
    finally:
        await client.close()


def benchmark(model_dir: str, params: dict) -> dict:
    """Start the server, run every level, stop the server; return the result record."""
    from transformers import AutoTokenizer

    cfg = {**UNSET, **resolve("serving", params)}
    levels = [int(c) for c in cfg["concurrency"]]
    if not levels or min(levels) < 1:
        raise SnaketuneError("serving_bench.concurrency must be a list of positive integers, e.g. [1, 4]")
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts_by_level = {}
    for i, c in enumerate(levels):
        n = int(cfg["requests"] or 4 * c)
        prompts_by_level[c] = make_prompts(tok, n, int(cfg["prompt_tokens"]), int(cfg["seed"]) + 1000 * i)
    warmup = make_prompts(tok, int(cfg["warmup"]), int(cfg["prompt_tokens"]), int(cfg["seed"]) - 1)
    images = is_vision(model_dir)
    if images:  # every request carries one image
        prompts_by_level = {c: [image_prompt(p, int(cfg["seed"]) + 7919 * i + c) for i, p in enumerate(ps)]
                            for c, ps in prompts_by_level.items()}
        warmup = [image_prompt(p, int(cfg["seed"]) - 1 - i) for i, p in enumerate(warmup)]

    server = ServerProcess(model_dir, cfg)
    record = {
        "schema_version": SCHEMA_VERSION,
        "model_path": str(Path(model_dir).resolve()),
        "engine": cfg["engine"],
        "config": {k: cfg[k] for k in CONFIG_KEYS},
        "images_per_request": 1 if images else 0,
        "host": platform.node(),
        "python": sys.version.split()[0],
    }
    qpath = Path(model_dir) / "quantization.json"
    if qpath.is_file():
        record["quantization"] = json.loads(qpath.read_text()).get("method")
    try:
        with terminate_as_exit():
            try:
                server.start()
                server.wait_ready()
                record["server"] = {"command": shlex.join(server.command), "ready_s": round(server.ready_s, 2),
                                    "port": server.port}
                record["levels"] = asyncio.run(drive(server, prompts_by_level, warmup, cfg))
            finally:
                server.stop()
        left = server.alive_pids()
        record["server"]["stopped"] = not left
        record["peak_rss_mb"] = peak_rss_mb(children=True)  # the server is this step's child
        if left:
            raise SnaketuneError(f"server processes {left} survived SIGKILL; stop them by hand")
    finally:
        log = server.log_tail(20000)
        if log:
            print("--- server log (tail) ---\n" + log, file=sys.stderr)
        server.cleanup_log()
    return record


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m snaketune.serving_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model folder to serve")
    ap.add_argument("--params", required=True, help="JSON: the serving-bench block (engine, concurrency, ...)")
    ap.add_argument("--out", required=True, help="output JSON file")
    ap.add_argument("--model-name", help="the config's model key (recorded in the JSON)")
    ap.add_argument("--variant", help="base, a recipe or <base|recipe>/<quantize name> (recorded in the JSON)")
    args = ap.parse_args(argv)
    params = json.loads(args.params)
    if not (Path(args.model) / "config.json").is_file():
        raise SnaketuneError(f"serving_bench --model {args.model} is not an HF model folder (no config.json)")
    from snaketune.tracking import step_run

    with step_run("serving_bench", params) as run:
        record = {**record_names(args.model_name, args.variant), **benchmark(args.model, params)}
        for lvl in record["levels"]:
            c = lvl["concurrency"]
            run.log_metrics({f"c{c}.requests_per_s": lvl["requests_per_s"] or 0,
                             f"c{c}.output_tokens_per_s": lvl["output_tokens_per_s"] or 0,
                             f"c{c}.ttft_p50_ms": lvl["ttft_ms"]["p50"] or 0,
                             f"c{c}.tpot_p50_ms": lvl["tpot_ms"]["p50"] or 0,
                             f"c{c}.errors": lvl["errors"]})
        run.log_metrics({"server_ready_s": record["server"]["ready_s"]})
        write_json(args.out, record)
        run.log_artifact(args.out)
    for lvl in record["levels"]:
        print(f"c={lvl['concurrency']}: {lvl['requests_per_s']} req/s, {lvl['output_tokens_per_s']} tok/s, "
              f"TTFT p50 {lvl['ttft_ms']['p50']} ms, TPOT p50 {lvl['tpot_ms']['p50']} ms, errors {lvl['errors']}")


if __name__ == "__main__":
    main()
