"""Are CPU runs bitwise identical across CPU models when the numerics are pinned? (issue 18, item 5)

One short training of the demo's tiny model (config.yaml's ``tiny-qwen2``, LoRA SFT on the arithmetic
task, every step logged) through the train step's own command, ``python -m snaketune.train``, once
per setting:

| setting | environment |
|---|---|
| ``native`` | nothing pinned: the CPU's own ATen kernels, MKL's and oneDNN's own code paths |
| ``pinned`` | ``ATEN_CPU_CAPABILITY=default``, ``MKL_CBWR=COMPATIBLE``, ``ONEDNN_MAX_CPU_ISA=SSE41`` |
| ``native-mkl-avx2`` | ``native`` with MKL told this CPU has AVX2 at most (``MKL_ENABLE_INSTRUCTIONS=AVX2``): does MKL's code path change the bits here? |
| ``pinned-mkl-avx2`` | ``pinned`` with the same: on one machine, does the pinning hold when MKL would pick another code path? |

Both run on one thread (the step's CPU default). Each run's loss history and the sha256 of its
adapter weights go into benchmarks/results/cross-cpu.json under this CPU's model name, with the
wall time (what pinning costs); the table compares every setting with the same setting on each
other CPU model in the file: ``identical`` or the first step whose loss differs. The question needs
two CPU models: run it on each machine you get (the CPU changes between sessions).

    python benchmarks/cross_cpu.py [--steps 40] [--out benchmarks/results/cross-cpu.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from robustness import machine_caps  # noqa: E402
from snaketune.bundle import cpu_model  # noqa: E402

SETTINGS = {
    "native": {},
    "pinned": {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "SSE41"},
}
SETTINGS["native-mkl-avx2"] = {"MKL_ENABLE_INSTRUCTIONS": "AVX2"}
SETTINGS["pinned-mkl-avx2"] = {**SETTINGS["pinned"], "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
PINNED_AWAY = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "SNAKETUNE_TRACKING",
               "MLFLOW_TRACKING_URI")


def inputs(work: Path) -> tuple[Path, Path]:
    """The demo's tiny model and arithmetic dataset, built once (they are the same on every CPU:
    tests/test_determinism.py checks the builder; the hashes are recorded anyway)."""
    from snaketune.data import prepare
    from snaketune.model import fetch

    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    model, data = work / "model", work / "data"
    fetch({**config["models"]["tiny-qwen2"], "seed": config["seed"]}, model)
    prepare({**config["datasets"]["arith"], "seed": config["seed"]}, data)
    return model, data


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train(model: Path, data: Path, out: Path, steps: int, env: dict) -> dict:
    recipe = {"stage": "sft", "train_type": "lora", "dataset": "arith", "learning_rate": 1e-3, "batch_size": 32,
              "max_steps": steps, "max_length": 64, "logging_steps": 1, "save_steps": 10**6, "seed": 0}
    t0 = time.time()
    result = subprocess.run([sys.executable, "-m", "snaketune.train", "--base", str(model), "--data", str(data),
                             "--params", json.dumps(recipe), "--out", str(out)], capture_output=True, text=True,
                            env={**{k: v for k, v in os.environ.items() if k not in PINNED_AWAY},
                                 "PYTHONPATH": str(ROOT / "scripts"), **env})
    if result.returncode:
        raise SystemExit(f"training failed under {env}:\n{result.stderr[-3000:]}")
    record = json.loads((out / "training.json").read_text())
    return {"env": env, "seconds": round(time.time() - t0, 1),
            "losses": [h["loss"] for h in record["log_history"] if "loss" in h],
            "adapter_sha256": sha256(out / "adapter_model.safetensors")}


def compare(a: dict, b: dict) -> str:
    if a["adapter_sha256"] == b["adapter_sha256"] and a["losses"] == b["losses"]:
        return "identical"
    for i, (x, y) in enumerate(zip(a["losses"], b["losses"])):
        if x != y:
            return f"differs from step {i + 1} ({x!r} vs {y!r})"
    return "same losses, other weights"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/cross-cpu.json")
    args = ap.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        model, data = inputs(Path(tmp))
        here = {"native_capability": machine_caps()[-1], "torch": torch.__version__, "steps": args.steps,
                "model_sha256": sha256(model / "model.safetensors"),
                "data_sha256": json.loads((data / "manifest.json").read_text())["sha256"]["train"],
                "date": time.strftime("%Y-%m-%d"),
                "runs": {name: train(model, data, Path(tmp) / name, args.steps, env) for name, env in SETTINGS.items()}}
    known = json.loads(args.out.read_text()) if args.out.is_file() else {}
    machine = cpu_model()
    known[machine] = here
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(known, indent=1) + "\n")
    runs = here["runs"]
    print(f"{machine} ({here['native_capability']}), torch {here['torch']}, {args.steps} steps")
    print("| setting | seconds | final loss | adapter sha256 | vs native here | vs pinned here |")
    print("|---|---:|---:|---|---|---|")
    for name, run in runs.items():
        print(f"| {name} | {run['seconds']} | {run['losses'][-1]:.6f} | {run['adapter_sha256'][:16]} | "
              f"{compare(run, runs['native'])} | {compare(run, runs['pinned'])} |")
    for other, rec in known.items():
        if other == machine:
            continue
        same_inputs = (rec["model_sha256"], rec["data_sha256"], rec["steps"], rec["torch"]) == \
            (here["model_sha256"], here["data_sha256"], here["steps"], here["torch"])
        print(f"\nvs {other} ({rec['native_capability']}, {rec['date']})"
              + ("" if same_inputs else ": other inputs, steps or torch; not comparable"))
        if same_inputs:
            for name, run in runs.items():
                print(f"  {name}: {compare(run, rec['runs'][name])}")


if __name__ == "__main__":
    main()
