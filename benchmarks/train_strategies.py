"""Single-GPU runs of the train step under each multi-process strategy: plain, FSDP2, DeepSpeed
ZeRO-2 and ZeRO-3 (one rank each; the multi-GPU runs are a separate benchmark).

Each strategy trains the same random-init Qwen2.5-0.5B-architecture model, full fine-tuning in
bf16, on the same packed text batches, through ``snaketune.train.train`` (the function the rule
runs), in its own process. Reports tokens/s, peak GPU memory and the loss curve, and checks that
every strategy's losses match the plain run's. Writes benchmarks/results/<date>-<gpu>-strategies.json.

    python benchmarks/train_strategies.py [--steps 20] [--out DIR]
"""

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = {
    "plain": None,
    "fsdp2": {"strategy": "fsdp"},
    "zero2": {"strategy": "deepspeed", "zero_stage": 2},
    "zero3": {"strategy": "deepspeed", "zero_stage": 3},
}
QWEN_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096)


def build_inputs(work: Path) -> tuple[Path, Path]:
    """A random-init 0.5B model folder (locally trained tokenizer) and a text dataset folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from snaketune.data import prepare
    from snaketune.model import build_tokenizer

    model_dir, data_dir = work / "model", work / "data"
    tokenizer = build_tokenizer(1024)
    config = AutoConfig.for_model("qwen2", tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id, **QWEN_05B)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rng = random.Random(0)
    words = "the of and to in is that it was for on are as with his they at be this from have".split()
    rows = [{"text": " ".join(rng.choices(words, k=900))} for _ in range(400)]
    (work / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare({"source": "local", "path": str(work / "text.jsonl"), "format": "text", "test_size": 1}, data_dir)
    return model_dir, data_dir


def run_one(name: str, model_dir: Path, data_dir: Path, steps: int, work: Path) -> dict:
    recipe = {"stage": "pt", "train_type": "full", "max_steps": steps, "batch_size": 8, "max_length": 1024,
              "learning_rate": 1e-5, "logging_steps": 1, "save_steps": 10_000, "dtype": "bf16",
              "packing": True, "fused_ce": True, "seed": 0}
    if STRATEGIES[name]:
        recipe["distributed"] = STRATEGIES[name]
    code = (
        "import json, sys, torch\n"
        "from snaketune.train import train\n"
        "s = train(sys.argv[1], [sys.argv[2]], json.loads(sys.argv[3]), sys.argv[4], sys.argv[5])\n"
        "s['peak_gib'] = torch.cuda.max_memory_allocated() / 2**30\n"
        "print('RESULT ' + json.dumps({k: s[k] for k in ('tokens_per_s', 'wall_seconds', 'steps', 'peak_gib', "
        "'log_history')}))\n")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", code, str(model_dir), str(data_dir), json.dumps(recipe),
                           str(work / f"out-{name}"), str(work / f"ckpt-{name}")],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or "RESULT " not in proc.stdout:
        return {"strategy": name, "ok": False, "error": (proc.stdout + proc.stderr)[-3000:]}
    s = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
    losses = [h["loss"] for h in s.pop("log_history") if "loss" in h]
    saved = (work / f"out-{name}" / "model.safetensors").is_file()
    return {"strategy": name, "ok": saved, "losses": losses, "wall_s": round(time.time() - t0, 1),
            **{k: round(v, 2) if isinstance(v, float) else v for k, v in s.items()}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    ap.add_argument("--work", default="/tmp/snaketune-strategies")
    args = ap.parse_args()
    import torch
    import transformers

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir, data_dir = build_inputs(work)
    results = [run_one(name, model_dir, data_dir, args.steps, work) for name in STRATEGIES]
    plain = next(r for r in results if r["strategy"] == "plain")
    for r in results:
        if r.get("losses") and plain.get("losses"):
            r["max_loss_rel_diff_vs_plain"] = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], plain["losses"]))
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import deepspeed

        versions["deepspeed"] = deepspeed.__version__
    except ImportError:
        versions["deepspeed"] = None
    gpu = torch.cuda.get_device_name(0)
    report = {"date": time.strftime("%Y-%m-%d"), "gpu": gpu, "versions": versions, "model": "Qwen2.5-0.5B arch",
              "batch": "8 packed samples x <=1024 tokens, bf16, full fine-tuning", "results": results}
    print("| strategy | ok | tokens/s | peak GiB | max loss rel. diff vs plain |\n|---|---|---:|---:|---:|")
    for r in results:
        print(f"| {r['strategy']} | {r['ok']} | {r.get('tokens_per_s', '-')} | {r.get('peak_gib', '-')} | "
              f"{r.get('max_loss_rel_diff_vs_plain', '-')} |")
        if not r["ok"]:
            print(r.get("error", "")[-1500:])
    out = Path(os.environ.get("OUT", args.out))
    out.mkdir(parents=True, exist_ok=True)
    tag = gpu.split()[1].lower() if len(gpu.split()) > 1 else "gpu"
    (out / f"{report['date']}-{tag}-strategies.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
