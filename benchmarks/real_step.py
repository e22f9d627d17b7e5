"""The product's train step on one GPU, started exactly as workflow/rules/train.smk starts it.

Each run is ``python -m snaketune.launch --gpus 1 --nodes 1 -- python -m snaketune.train --base B
--data D --params JSON --out O --checkpoints C --cache-dir K`` with ``SNAKETUNE_TRACKING`` and
``SNAKETUNE_JOB`` set as the rule sets them (MLflow into an SQLite store), the recipe filled with
the schema's defaults as the workflow's config validation fills it. Models are random-init
Qwen2.5 architectures at real size built by the speed bench's baseline script (``build``, real
151,936-token vocabulary, so the LM head and the loss have their real cost) with snaketune's tiny
byte-level BPE tokenizer (its ids are the first ~4k of the vocabulary; transformers 5 loads a
Qwen2 folder's tokenizer as Qwen2Tokenizer, which takes only byte-level BPE); every SFT sample is
2,048 tokens after truncation, so a step is batch_size×2048 tokens, the shape of sft_speed.py's rows.

Recorded per run: training.json (steady-state ``tokens_per_s``, ``wall_seconds``,
``warmup_seconds``, GPU peak), the same rate measured from outside (arrival times of the step's
progress lines, printed every ``logging_steps`` after the loss is read, which waits for the GPU:
first logged step to last), what the MLflow run holds, and the process's wall time.

    PYTHONPATH=scripts python3 benchmarks/real_step.py --baseline .bench_carry/hf_peft_baseline.py \
        --work /tmp/rs --out DIR [--only NAME,...] [--steps 60]

Writes DIR/real_step.json and DIR/real_step.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "benchmarks"))

SEQ = 2048
FULL = {"stage": "sft", "train_type": "full", "batch_size": 4}
LORA = {"stage": "sft", "train_type": "lora", "batch_size": 4}
C4K = {"compile": True, "ce_chunk_tokens": 4096}
# name: (size, recipe keys beyond the schema's defaults)
PLAN = [
    ("r-1.5b-full-default", "1.5b", FULL),
    ("r-1.5b-full-dtype", "1.5b", {**FULL, "master_weights": "dtype"}),
    ("r-1.5b-full-c4k", "1.5b", {**FULL, **C4K}),
    ("r-1.5b-full-c4k-noclip", "1.5b", {**FULL, **C4K, "max_grad_norm": 0.0}),
    ("r-1.5b-full-c4k-varlenrows", "1.5b", {**FULL, **C4K, "varlen_rows": True}),
    ("r-7b-lora-default", "7b", LORA),
    ("r-7b-lora-compile", "7b", {**LORA, "compile": True}),
    ("r-7b-lora-c4k", "7b", {**LORA, **C4K}),
]


def schema_recipe(keys: dict, steps: int) -> dict:
    """A recipe block as the workflow hands it to the step: the config schema's defaults filled in
    (snaketune.schema.resolve, as the workflow's validation fills them: defaults that depend on the
    recipe, such as learning_rate by train_type, included), plus the study seed."""
    from snaketune.schema import resolve

    return {"seed": 0, **resolve("recipes", {"dataset": "fixed2048", "max_steps": steps, **keys})}


def build_model(bl, size: str, folder: Path) -> Path:
    """``bl.build(size)`` saved as an HF model folder with snaketune's tiny tokenizer (once)."""
    if (folder / "config.json").is_file():
        return folder
    import torch

    from snaketune.model import build_tokenizer

    model = bl.build(size)
    tokenizer = build_tokenizer(4096)
    model.config.eos_token_id = model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = folder.with_name(folder.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    os.replace(tmp, folder)
    return folder


def build_data(folder: Path, samples: int, seed: int = 0) -> Path:
    """SFT rows of random words, each longer than 2,048 tokens: cut to 2,048 by truncation."""
    if (folder / "train.jsonl").is_file():
        return folder
    from snaketune.model import tokenizer_corpus

    vocab = sorted({w for line in tokenizer_corpus(n=50) for w in line.split() if w.isalpha()})
    rng = random.Random(seed)
    words = lambda n: " ".join(rng.choice(vocab) for _ in range(n))  # noqa: E731
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"messages": [{"role": "user", "content": words(64)}, {"role": "assistant", "content": words(SEQ + 64)}]}
            for _ in range(samples)]
    with open(folder / "test.jsonl", "w") as fh:
        fh.write(json.dumps(rows[0]) + "\n")
    with open(folder / "train.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    return folder


STEP_LINE = re.compile(r"^step (\d+)/(\d+) \|")


def run_step(name: str, base: Path, data: Path, recipe: dict, work: Path) -> dict:
    """One train step as the rule runs it; progress lines timestamped on arrival."""
    out, ckpt = work / name / "model", work / name / "checkpoints"
    log = work / name / "train.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "SNAKETUNE_JOB": f"train_full[model={base.name},recipe={name}]",
           "SNAKETUNE_TRACKING": json.dumps({"uri": f"sqlite:///{work}/mlflow.db", "experiment": "real-step",
                                             "tags": {"study": "real-step"}})}
    cmd = [sys.executable, "-m", "snaketune.launch", "--gpus", "1", "--nodes", "1", "--",
           sys.executable, "-m", "snaketune.train", "--base", str(base), "--data", str(data),
           "--params", json.dumps(recipe, sort_keys=True), "--out", str(out), "--checkpoints", str(ckpt),
           "--cache-dir", str(work / "cache")]
    t0 = time.perf_counter()
    marks = []
    with open(log, "w") as fh, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                text=True, bufsize=1) as proc:
        for line in proc.stdout:
            now = time.perf_counter()
            fh.write(line)
            if m := STEP_LINE.match(line):
                marks.append((int(m.group(1)), now))
    wall = time.perf_counter() - t0
    r = {"name": name, "recipe": recipe, "returncode": proc.returncode, "process_wall_s": round(wall, 1)}
    if proc.returncode:
        r["error"] = log.read_text()[-3000:]
        return r
    t = json.loads((out / "training.json").read_text())
    shutil.rmtree(out)  # the weights are not needed (a 1.5B full run leaves ~24 GB with its checkpoint)
    shutil.rmtree(ckpt)
    r["training_json"] = {k: t.get(k) for k in ("steps", "tokens", "tokens_per_s", "wall_seconds", "warmup_seconds",
                                                 "warmup_steps", "steady_steps", "steady_tokens", "steady_seconds",
                                                 "gpu_peak_gib", "speedups", "dtype", "first_loss", "final_loss")}
    per_step = t["tokens"] / t["steps"]
    if len(marks) >= 2:
        (k0, t_a), (k1, t_b) = marks[0], marks[-1]
        r["outside"] = {"from_step": k0, "to_step": k1, "tokens_per_step": per_step,
                        "tokens_per_s": (k1 - k0) * per_step / (t_b - t_a)}
        r["logged_vs_outside"] = t["tokens_per_s"] / r["outside"]["tokens_per_s"] - 1
    r["mlflow"] = mlflow_metrics(work, env["SNAKETUNE_JOB"])
    return r


def mlflow_metrics(work: Path, job: str) -> dict:
    """The final metrics of the MLflow run of ``job`` and its per-log interval_tokens_per_s series."""
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{work}/mlflow.db")
        exp = client.get_experiment_by_name("real-step")
        run = client.search_runs([exp.experiment_id], f"tags.`snakemake.job` = '{job}'",
                                 order_by=["attributes.start_time DESC"], max_results=1)[0]
        keys = ("tokens_per_s", "wall_seconds", "warmup_seconds", "gpu_peak_gib", "steps")
        return {"final": {k: run.data.metrics.get(k) for k in keys},
                "interval_tokens_per_s": [round(m.value) for m in client.get_metric_history(run.info.run_id,
                                                                                           "interval_tokens_per_s")]}
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        return {"error": repr(e)[:300]}


def table(rows: list[dict]) -> str:
    lines = ["| run | speed-ups | tokens/s (training.json) | outside | logged/outside | wall s | warm-up s | "
             "GPU peak GiB | MLflow tokens_per_s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("returncode"):
            lines.append(f"| {r['name']} | failed (rc {r['returncode']}) | | | | | | | |")
            continue
        t, o = r["training_json"], r.get("outside", {})
        on = ",".join(k for k, v in (t["speedups"] or {}).items() if v)
        extra = {k: r["keys"][k] for k in ("ce_chunk_tokens", "varlen_rows", "max_grad_norm") if k in r["keys"]}
        on += "".join(f" {k}={v}" for k, v in extra.items())
        ml = (r.get("mlflow") or {}).get("final", {}).get("tokens_per_s")
        lines.append(f"| {r['name']} | {on} | {t['tokens_per_s']:,.0f} | {o.get('tokens_per_s', 0):,.0f} | "
                     f"{r.get('logged_vs_outside', 0) * 100:+.1f}% | {t['wall_seconds']:.0f} | "
                     f"{t['warmup_seconds']:.0f} | {t['gpu_peak_gib'] or 0:.1f} | {ml or 0:,.0f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", default=str(ROOT.parent / "shared" / "bench" / "hf_peft_baseline.py"))
    ap.add_argument("--work", required=True, help="folder for models, data, runs and the MLflow store")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--only", help="comma-separated run names (default: all)")
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args(argv)

    from sft_speed import load_baseline, versions

    bl = load_baseline(args.baseline)
    work, out = Path(args.work).resolve(), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"versions": versions(), "steps": args.steps, "seq": SEQ}
    print(json.dumps(meta), flush=True)
    only = set(args.only.split(",")) if args.only else None
    rows = []
    for name, size, keys in PLAN:
        if only and name not in only:
            continue
        recipe = schema_recipe(keys, args.steps)
        base = build_model(bl, size, work / "models" / f"qwen2.5-{size}")
        data = build_data(work / "data" / "fixed2048", recipe["batch_size"] * (args.steps + 1))
        r = {"size": size, "keys": keys, **run_step(name, base, data, recipe, work)}
        rows.append(r)
        print("RUN", json.dumps({k: v for k, v in r.items() if k != "recipe"}), flush=True)
        (out / "real_step.json").write_text(json.dumps({**meta, "runs": rows}, indent=1))
    md = table(rows)
    (out / "real_step.md").write_text(md + "\n")
    print(md, flush=True)


if __name__ == "__main__":
    main()
