"""Training quality side by side with ms-swift: the same data, base model, settings and scorer.

Runs the study of ``../shared/parity`` (full SFT 1000 steps, LoRA r32 on top of it, DPO 50 steps
from the full SFT model) through snaketune's workflow (``snakemake`` on the shared
``snaketune-config.yaml``, the study seed set with ``--config seed=N``) and through ms-swift's
``swift sft`` / ``swift rlhf`` (the shared command lines, ``--seed``/``--data_seed N``), for each
seed, and scores every model with the shared ``eval_acc.py`` (greedy, 200 held-out sums).

    python benchmarks/parity.py --work /tmp/parity --seeds 0 1 2 --swift /path/to/venv/bin/swift
    python benchmarks/parity.py --work /tmp/parity --systems snaketune --set optim=adamw_torch_fused --tag fused

``--set KEY=VALUE`` overrides a key of every snaketune recipe (one difference at a time, for the
swaps recorded in docs/parity.md). Rows are appended to ``benchmarks/results/parity.json``
(system, tag, step, seed, accuracy, seconds per optimizer step, CPU capability) and the table of
means is printed. One thread per run; two runs at a time (``--jobs``).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

from snaketune.schema import block_schema

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks/results/parity.json"
SHARED = ROOT.parent / "shared/parity"  # the steering side's study (the issue's); --shared picks another
STEPS = ("full", "lora", "dpo")
SNAKETUNE_RECIPES = {"full": "sft-full", "lora": "lora", "dpo": "dpo"}


def capability() -> str:
    import torch

    return torch.backends.cpu.get_cpu_capability()


def study_file(study: Path, name: str) -> Path:
    """A file of the study's folder; the scorer and the pair converter default to the shared study's."""
    return study / name if (study / name).is_file() else SHARED / name


def prepare(shared: Path, work: Path) -> None:
    """The study's tiny base, the data, and the DPO pairs in snaketune's preference layout."""
    py = sys.executable
    if not (work / "tiny_base/config.json").is_file():
        subprocess.run([py, shared / "build_tiny.py", work / "tiny_base"], check=True, capture_output=True)
    if not (work / "data/dpo_pref.jsonl").is_file():
        subprocess.run([py, shared / "gen_data.py", work / "data"], check=True, capture_output=True)
        subprocess.run([py, study_file(shared, "to_pref.py"), work / "data/dpo_train.jsonl",
                        work / "data/dpo_pref.jsonl"], check=True)


def score(shared: Path, work: Path, model: Path) -> float:
    out = subprocess.run([sys.executable, study_file(shared, "eval_acc.py"), "--model", model, "--heldout",
                          work / "data/heldout.jsonl"], check=True, capture_output=True, text=True,
                         env={**os.environ, "NTHREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])["acc"]


def nest_method_keys(recipe: dict) -> None:
    """Move a stage's own keys (``beta``, ...) from the recipe's top level, where the shared config
    writes them as snaketune did before per-method blocks, into the stage's block (``dpo: {beta: ...}``)."""
    own = block_schema("recipes")["properties"].get(recipe["stage"], {}).get("properties", {})
    moved = {key: recipe.pop(key) for key in list(recipe) if key in own}
    if moved:
        recipe.setdefault(recipe["stage"], {}).update(moved)


def run_snaketune(shared: Path, work: Path, seed: int, tag: str, overrides: dict, steps: list[str]) -> list[dict]:
    """The shared study through the workflow; one row per step."""
    folder = work / f"snaketune-{tag}-s{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load((shared / "snaketune-config.yaml").read_text())
    config["models"]["tiny"]["path"] = str(work / "tiny_base")
    for dataset in config["datasets"].values():
        for key in ("path", "test_path"):
            dataset[key] = str(work / "data" / Path(dataset[key]).name)
    for recipe in config["recipes"].values():
        nest_method_keys(recipe)
        recipe.update(overrides)
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    targets = [f"results/tiny/{SNAKETUNE_RECIPES[s]}/model" for s in steps]
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "workflow/Snakefile"), "--directory",
           str(folder), "--configfile", str(folder / "config.yaml"), "--cores", "1", "--config", f"seed={seed}",
           "--", *targets]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "SNAKETUNE_TRACKING")}
    with open(folder / "snakemake.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=folder)
    rows = []
    for step in steps:
        recipe = SNAKETUNE_RECIPES[step]
        kind = "adapter" if step == "lora" else "model"
        record = json.loads((folder / f"results/tiny/{recipe}/{kind}/training.json").read_text())
        seconds = record.get("wall_seconds", record.get("seconds"))
        rows.append({"step": step, "acc": score(shared, work, folder / f"results/tiny/{recipe}/model"),
                     "s_per_step": seconds / record["steps"]})
    return rows


def swift_commands(shared: Path, seed: int, out: str) -> dict[str, str]:
    """The shared ms-swift training command lines of each step, for ``seed``, writing under ``out``."""
    lines = [line for line in (shared / "ms-swift-commands.txt").read_text().splitlines()
             if line.startswith(("swift sft", "swift rlhf"))]
    cmds = {}
    for step, line in zip(STEPS, lines):
        line = line.replace("out1/", f"{out}/").replace("--seed 0 --data_seed 0", f"--seed {seed} --data_seed {seed}")
        cmds[step] = line
    return cmds


def swift_runtime(log: str) -> tuple[float, int]:
    """(train_runtime seconds, steps) from a swift log."""
    runtime = float(re.findall(r"'train_runtime': '?([0-9.]+)", log)[-1])
    steps = int(re.findall(r"global_step/max_steps': '(\d+)/", log)[-1])
    return runtime, steps


def run_swift(shared: Path, work: Path, seed: int, swift: str, steps: list[str]) -> list[dict]:
    """The shared study through ms-swift (full SFT always: LoRA and DPO start from it)."""
    folder = work / f"swift-s{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tiny_base", "data"):
        if not (folder / name).exists():
            (folder / name).symlink_to(work / name)
    cmds = swift_commands(shared, seed, "out")
    outputs = {"full": "out/sft_full/checkpoint-1000", "lora": "out/sft_lora_merged", "dpo": "out/dpo_full/checkpoint-50"}
    merge = [swift, "export", "--adapters", "out/sft_lora/checkpoint-1000", "--merge_lora", "true",
             "--output_dir", "out/sft_lora_merged"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows = []
    for step in [s for s in STEPS if s == "full" or s in steps]:
        log = folder / f"{step}.log"
        with open(log, "w") as fh:
            subprocess.run([swift, *shlex.split(cmds[step])[1:]], check=True, stdout=fh, stderr=subprocess.STDOUT,
                           cwd=folder, env=env)
            if step == "lora":
                subprocess.run(merge, check=True, stdout=fh, stderr=subprocess.STDOUT, cwd=folder, env=env)
        if step in steps:
            runtime, n = swift_runtime(log.read_text())
            rows.append({"step": step, "acc": score(shared, work, folder / outputs[step]), "s_per_step": runtime / n})
    return rows


def table(rows: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r.get("study", "parity"), r["system"], r["tag"], r["capability"], r["step"]), []).append(r)
    lines = ["| study | system | tag | capability | step | seeds | accuracy per seed | mean | s/step (median) |",
             "|---|---|---|---|---|---|---|---:|---:|"]
    for (study, system, tag, cap, step), rs in sorted(groups.items()):
        rs.sort(key=lambda r: r["seed"])
        accs = [r["acc"] for r in rs]
        times = sorted(r["s_per_step"] for r in rs)
        lines.append(f"| {study} | {system} | {tag} | {cap} | {step} | {','.join(str(r['seed']) for r in rs)} | "
                     f"{' / '.join(f'{a:.3f}' for a in accs)} | {sum(accs) / len(accs):.3f} | "
                     f"{times[len(times) // 2]:.3f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=SHARED,
                    help="the study's folder (build_tiny.py, gen_data.py, snaketune-config.yaml, "
                         "ms-swift-commands.txt); benchmarks/parity2 is the second study")
    ap.add_argument("--work", type=Path, required=True, help="scratch folder (models, data, runs)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--systems", nargs="+", choices=["snaketune", "swift"], default=["snaketune", "swift"])
    ap.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    ap.add_argument("--swift", default="swift", help="the swift command of an ms-swift 4.6.0 venv")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override snaketune recipe keys")
    ap.add_argument("--tag", default="default", help="label of this configuration in the table")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    prepare(args.shared.resolve(), work)
    overrides = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    cap = capability()
    meta = {"study": args.shared.resolve().name, "capability": cap, "mkl_cbwr": os.environ.get("MKL_CBWR"), "machine": platform.processor() or platform.machine(),
            "date": time.strftime("%Y-%m-%d")}

    def one(system: str, seed: int) -> list[dict]:
        t0 = time.time()
        if system == "snaketune":
            rows = run_snaketune(args.shared.resolve(), work, seed, args.tag, overrides, args.steps)
            tag = args.tag
        else:
            rows = run_swift(args.shared.resolve(), work, seed, args.swift, args.steps)
            tag = "ms-swift-4.6.0"
        out = [{"system": system, "tag": tag, "seed": seed, **meta, **r, "overrides": overrides if
                system == "snaketune" else {}} for r in rows]
        print(f"{system} seed {seed} ({time.time() - t0:.0f} s): "
              + ", ".join(f"{r['step']} {r['acc']:.3f}" for r in out), flush=True)
        return out

    rows = []
    with cf.ThreadPoolExecutor(args.jobs) as pool:
        for fut in [pool.submit(one, system, seed) for seed in args.seeds for system in args.systems]:
            rows += fut.result()
    previous = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    RESULTS.write_text(json.dumps(previous + rows, indent=1) + "\n")
    print(table(previous + rows))


if __name__ == "__main__":
    main()
