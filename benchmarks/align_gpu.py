"""The align step on one GPU: every method's quality on the tiny task, and speed at 0.5B scale.

Quality rows repeat tests/test_align.py on CUDA (``--dtype auto``: bf16 autocast over fp32 master
weights; or ``--dtype fp32``): a 500-step full SFT of the tiny Qwen2 model on sums of 0..19 by
``snaketune.train``, then from it each
preference method (100 steps, full, lr 1e-4), a reward model, GRPO with the exact-match reward
(16 prompts, 8 generations, 40 steps) and a few LoRA steps of every GRPO-family variant. Each row
reports held-out pair accuracy before -> after (preference methods, rm) or the mean reward of the
first and last 10 steps (grpo), seconds per step and peak GPU memory.

Speed rows use a random-init Qwen2.5-0.5B architecture (24 layers, hidden 896; the tokenizer is
trained here, so the vocabulary is small) on synthetic prompts of ``--prompt-tokens`` tokens:
DPO and KTO with LoRA on 128-token completions, and GRPO with LoRA generating 8 x 128 tokens per
prompt with transformers (vLLM is used when installed; the row says which).

    PYTHONPATH=scripts python3 benchmarks/align_gpu.py --out DIR [--only NAME,...] [--dtype fp32]

Results of 2026-12-02 (H200): benchmarks/results/2026-12-02-h200-align.md.

Writes DIR/align_gpu.json and DIR/align_gpu.md, printing each row as it finishes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import platform
import random
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

TINY = dict(source="tiny", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, seed=0)
QWEN05 = dict(source="tiny", hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
              num_key_value_heads=2, vocab_size=1024, max_position_embeddings=4096, seed=0)
PREFERENCE = {"dpo": {"dpo": {"beta": 0.5}}, "kto": {"kto": {"beta": 0.5}}, "orpo": {"orpo": {"beta": 0.1}},
              "simpo": {"simpo": {"beta": 2.0, "simpo_gamma": 0.5}}, "cpo": {"cpo": {"beta": 0.1}}}
VARIANTS = ("dapo", "dr_grpo", "bnpo", "gspo", "cispo", "sapo", "luspo", "vespo", "rloo", "reinforce++")


def heldout(data_dir: Path) -> list[dict]:
    """The right answer of each held-out sum against answers off by +-1, +-2, +-10."""
    from snaketune.data import addition_pairs
    from snaketune.files import read_jsonl

    return addition_pairs(read_jsonl(data_dir / "test.jsonl"))


def mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def peak_gib() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def load(out: Path, base: Path):
    """The trained policy (model folder, or adapter on ``base``) in fp32 on the device, for scoring."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "adapter_config.json").is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)
    else:
        model = AutoModelForCausalLM.from_pretrained(out)
    return model.to(device(), torch.float32), AutoTokenizer.from_pretrained(base)


def timed_align(base: Path, data: list[Path], recipe: dict, work: Path, name: str):
    """Run snaketune.align; return (summary, metric series, seconds per step, peak GiB)."""
    import torch

    from snaketune.align import align
    from snaketune.tracking import MemoryRun

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    run = MemoryRun()
    out = work / name
    summary = align(str(base), [str(d) for d in data], recipe, str(out), str(work / f"{name}.ckpt"), run)
    return out, summary, run.metrics, summary["wall_seconds"] / max(summary["steps"], 1), peak_gib()


# --------------------------------------------------------------------------------------- quality


def quality_rows(work: Path, only, dtype: str) -> list[dict]:
    from snaketune.align import preference_accuracy, reward_accuracy
    from snaketune.data import addition_pairs, prepare
    from snaketune.model import fetch
    from snaketune.rewards import load_reward_model
    from snaketune.tracking import MemoryRun
    from snaketune.files import read_jsonl
    from snaketune.train import train

    tiny, arith = work / "tiny", work / "arith20"
    fetch(TINY, tiny)
    prepare({"source": "synthetic", "max_operand": 20, "n_test": 40, "seed": 0}, arith)
    sft = work / "sft"
    t0 = time.time()
    train(str(tiny), [str(arith)], {"stage": "sft", "train_type": "full", "learning_rate": 5e-3,
                                    "lr_scheduler": "constant", "batch_size": 16, "max_steps": 500, "max_length": 48,
                                    "logging_steps": 100, "save_steps": 10000, "seed": 0, "dtype": dtype},
          str(sft), str(work / "sft.ckpt"), MemoryRun())
    model, tok = load(sft, sft)
    start = preference_accuracy(model, tok, heldout(arith))
    rows = [{"name": "sft-tiny", "kind": "quality", "steps": 500, "s_per_step": (time.time() - t0) / 500,
             "heldout_pair_accuracy": start["accuracy"], "heldout_margin": start["margin"]}]
    print(f"start (SFT): held-out pair accuracy {start['accuracy']:.3f}, margin {start['margin']:.2f}",
          flush=True)

    for stage, params in PREFERENCE.items():
        name = f"{stage}-tiny-full"
        if only and name not in only:
            continue
        recipe = {"stage": stage, "train_type": "full", "learning_rate": 1e-4, "lr_scheduler": "constant",
                  "batch_size": 16, "max_steps": 100, "logging_steps": 10, "seed": 0, "dtype": dtype, **params}
        rows.append(guard(name, lambda: preference_row(name, stage, recipe, sft, arith, work, start)))
        print(json.dumps(rows[-1]), flush=True)

    def rm_row():
        pairs = work / "pairs"
        pairs.mkdir(exist_ok=True)
        (pairs / "preference.jsonl").write_text(
            "".join(json.dumps(p) + "\n" for p in addition_pairs(read_jsonl(arith / "train.jsonl"))))
        backbone = work / "sft800"
        train(str(sft), [str(arith)], {"stage": "sft", "train_type": "full", "learning_rate": 5e-3,
                                       "lr_scheduler": "constant", "batch_size": 16, "max_steps": 300,
                                       "max_length": 48, "logging_steps": 100, "save_steps": 10000, "seed": 1,
                                       "dtype": dtype},
              str(backbone), str(work / "sft800.ckpt"), MemoryRun())
        recipe = {"stage": "rm", "train_type": "full", "learning_rate": 1e-3, "batch_size": 16, "max_steps": 1000,
                  "weight_decay": 0.1, "logging_steps": 50, "seed": 0, "dtype": dtype}
        out, summary, _, sps, mem = timed_align(backbone, [pairs], recipe, work, "rm")
        model, rtok = load_reward_model(out)
        acc = reward_accuracy(model.to(device()), rtok, heldout(arith))
        return {"name": "rm-tiny-full", "kind": "quality", "steps": summary["steps"], "s_per_step": sps,
                "peak_GiB": mem, "heldout_pair_accuracy": acc["accuracy"]}

    def grpo_row():
        data = work / "small"
        data.mkdir(exist_ok=True)
        (data / "train.jsonl").write_text("".join(open(arith / "train.jsonl").readlines()[:16]))
        recipe = {"stage": "grpo", "train_type": "full", "learning_rate": 3e-3, "lr_scheduler": "cosine",
                  "batch_size": 8, "max_steps": 40, "logging_steps": 1, "seed": 0, "dtype": dtype,
                  "grpo": {"variant": "grpo", "num_generations": 8, "max_completion_length": 6, "temperature": 1.0}}
        _, summary, m, sps, mem = timed_align(sft, [data], recipe, work, "grpo")
        return {"name": "grpo-tiny-full", "kind": "quality", "steps": summary["steps"], "s_per_step": sps,
                "peak_GiB": mem, "reward_first10": mean(m["reward"][:10]), "reward_last10": mean(m["reward"][-10:]),
                "generation": "vllm" if use_vllm(recipe) else "transformers"}

    for name, fn in (("rm-tiny-full", rm_row), ("grpo-tiny-full", grpo_row)):
        if not only or name in only:
            rows.append(guard(name, fn))
            print(json.dumps(rows[-1]), flush=True)

    for variant in VARIANTS:
        name = f"{variant}-tiny-lora"
        if only and name not in only:
            continue

        def variant_row(variant=variant, name=name):
            recipe = {"stage": "grpo", "train_type": "lora", "learning_rate": 1e-3, "batch_size": 2, "max_steps": 3,
                      "logging_steps": 1, "seed": 0,
                      "grpo": {"variant": variant, "num_generations": 4, "max_completion_length": 4,
                               "rewards": [{"name": "exact_match"}, {"name": "format", "weight": 0.5}],
                               **({"beta": 0.04} if variant in ("dapo", "gspo") else {})}}
            _, summary, m, sps, mem = timed_align(sft, [arith], recipe, work, name)
            return {"name": name, "kind": "runs", "steps": summary["steps"], "s_per_step": sps, "peak_GiB": mem,
                    "logged": sorted(k for k in m if k in ("loss", "reward", "kl", "completions/mean_length"))}

        rows.append(guard(name, variant_row))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def preference_row(name, stage, recipe, sft, arith, work, start):
    from snaketune.align import preference_accuracy

    out, summary, m, sps, mem = timed_align(sft, [arith], recipe, work, name)
    model, tok = load(out, sft)
    after = preference_accuracy(model, tok, heldout(arith))
    return {"name": name, "kind": "quality", "steps": summary["steps"], "s_per_step": sps, "peak_GiB": mem,
            "start": start["accuracy"], "heldout_pair_accuracy": after["accuracy"], "heldout_margin": after["margin"],
            "logged_margin_first": m["margins"][0], "logged_margin_last": m["margins"][-1]}


def use_vllm(recipe: dict) -> bool:
    from snaketune.align import grpo_args

    return grpo_args(recipe)[1]["use_vllm"]


# ----------------------------------------------------------------------------------------- speed


def long_data(folder: Path, tokenizer, n: int, prompt_tokens: int, completion_tokens: int, seed: int = 0) -> Path:
    """Synthetic rows whose prompts and answers are exactly ``prompt_tokens`` and
    ``completion_tokens`` tokens of random words (before the chat template)."""
    from snaketune.model import tokenizer_corpus

    words = " ".join(tokenizer_corpus(seed, 50)).split()
    rng = random.Random(seed)

    def text(k):
        ids = tokenizer(" ".join(rng.choices(words, k=k)), add_special_tokens=False)["input_ids"]
        return tokenizer.decode(ids[:k])

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "preference.jsonl", "w") as pref, open(folder / "kto.jsonl", "w") as kto, \
            open(folder / "train.jsonl", "w") as sft:
        for i in range(n):
            prompt = [{"role": "user", "content": text(prompt_tokens)}]
            good, bad = text(completion_tokens), text(completion_tokens)
            pref.write(json.dumps({"prompt": prompt, "chosen": [{"role": "assistant", "content": good}],
                                   "rejected": [{"role": "assistant", "content": bad}]}) + "\n")
            kto.write(json.dumps({"prompt": prompt, "completion": [{"role": "assistant", "content": good}],
                                  "label": i % 2 == 0}) + "\n")
            sft.write(json.dumps({"messages": prompt + [{"role": "assistant", "content": good}]}) + "\n")
    return folder


def speed_rows(work: Path, only, prompt_tokens: int, steps: int) -> list[dict]:
    from snaketune.model import fetch

    base = work / "qwen2.5-0.5b-arch"
    fetch(QWEN05, base)
    from transformers import AutoTokenizer

    data = long_data(work / "long", AutoTokenizer.from_pretrained(base), 512, prompt_tokens, 128)
    common = {"train_type": "lora", "learning_rate": 1e-5, "max_steps": steps, "logging_steps": 1, "seed": 0,
              "max_length": prompt_tokens + 256, "save_steps": 10000}
    plans = {
        "dpo-0.5b-lora-8": {**common, "stage": "dpo", "batch_size": 8, "dpo": {"beta": 0.1}},
        "kto-0.5b-lora-8": {**common, "stage": "kto", "batch_size": 8, "kto": {"beta": 0.1}},
        "grpo-0.5b-lora-4x8": {**common, "stage": "grpo", "batch_size": 4,
                               "grpo": {"num_generations": 8, "max_completion_length": 128, "temperature": 1.0}},
    }
    rows = []
    for name, recipe in plans.items():
        if only and name not in only:
            continue

        def row(name=name, recipe=recipe):
            _, summary, m, sps, mem = timed_align(base, [data], recipe, work, name)
            r = {"name": name, "kind": "speed", "steps": summary["steps"], "s_per_step": sps, "peak_GiB": mem,
                 "trainable_params": summary["trainable_params"], "total_params": summary["total_params"]}
            if recipe["stage"] == "grpo":
                gen = recipe["batch_size"] * recipe["grpo"]["num_generations"]
                r["generation"] = "vllm" if use_vllm(recipe) else "transformers"
                r["completion_tokens_per_step"] = gen * mean(m["completions/mean_length"])
                r["completion_tokens_per_s"] = r["completion_tokens_per_step"] / sps
            else:
                r["pairs_per_s"] = recipe["batch_size"] / sps
            return r

        rows.append(guard(name, row))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def guard(name: str, fn) -> dict:
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - a failed row is reported, the others still run
        traceback.print_exc()
        return {"name": name, "error": f"{type(err).__name__}: {err}"}


def versions() -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("transformers", "trl", "peft", "accelerate", "datasets", "vllm"):
        out[name] = __import__(name).__version__ if importlib.util.find_spec(name) else None
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def table(rows: list[dict]) -> str:
    lines = ["| row | steps | s/step | peak GiB | result |", "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | | | | error: {r['error'][:120]} |")
            continue
        if "heldout_pair_accuracy" in r and "start" in r:
            res = f"held-out pair accuracy {r['start']:.3f} → {r['heldout_pair_accuracy']:.3f}"
        elif "heldout_pair_accuracy" in r:
            res = f"held-out pair accuracy {r['heldout_pair_accuracy']:.3f}"
        elif "reward_first10" in r:
            res = f"exact-match reward {r['reward_first10']:.3f} → {r['reward_last10']:.3f} ({r['generation']})"
        elif "completion_tokens_per_s" in r:
            res = f"{r['completion_tokens_per_s']:,.0f} generated tok/s ({r['generation']})"
        elif "pairs_per_s" in r:
            res = f"{r['pairs_per_s']:.1f} rows/s"
        else:
            res = "logged " + ", ".join(r.get("logged", []))
        mem = f"{r['peak_GiB']:.2f}" if "peak_GiB" in r else ""
        lines.append(f"| {r['name']} | {r['steps']} | {r['s_per_step']:.3f} | {mem} | {res} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for align_gpu.json and align_gpu.md")
    ap.add_argument("--only", help="comma-separated row names (default: all)")
    ap.add_argument("--skip", choices=("quality", "speed"), help="leave one group out")
    ap.add_argument("--dtype", default="auto", help="quality rows' recipe dtype: auto (bf16 on GPU), fp32")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--speed-steps", type=int, default=10)
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU: running on CPU (a check of the script, not a measurement)", file=sys.stderr)
    only = set(args.only.split(",")) if args.only else None
    work = Path(tempfile.mkdtemp(prefix="align-gpu-"))
    rows = []
    try:
        if args.skip != "quality":
            rows += quality_rows(work, only, args.dtype)
        if args.skip != "speed":
            rows += speed_rows(work, only, args.prompt_tokens, args.speed_steps)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"date": dt.date.today().isoformat(), "versions": versions(), "quality_dtype": args.dtype,
              "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "align_gpu.json").write_text(json.dumps(result, indent=1))
    (out / "align_gpu.md").write_text(table(rows) + "\n")
    print(table(rows))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
