"""How fast the workflow parses and plans a large study grid (no jobs run).

Builds a config of M models x R recipes x B benches (each model evaluated on base + every
recipe), runs `snakemake -n` on it three times and reports the best wall time, the job count
and the per-job cost. Writes benchmarks/results/dag_scale.json.

    python benchmarks/dag_scale.py [--models 10 --recipes 10 --benches 10]
"""

import argparse
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def grid_config(models: int, recipes: int, benches: int) -> dict:
    base = yaml.safe_load((ROOT / "config.yaml").read_text())
    tiny = base["models"]["tiny-qwen2"]
    return {
        "study": "dag-scale",
        "models": {f"m{i}": {**tiny, "seed": i} for i in range(models)},
        "datasets": {"arith": base["datasets"]["arith"]},
        "recipes": {f"r{i}": {**base["recipes"]["sft-lora"], "from": "base", "learning_rate": 1e-4 * (i + 1)}
                    for i in range(recipes)},
        "benches": {f"b{i}": {**base["benches"]["arith"], "max_new_tokens": 4 + i} for i in range(benches)},
        "evaluation": {"variants": ["base", *(f"r{i}" for i in range(recipes))],
                       "benches": [f"b{i}" for i in range(benches)]},
    }


def slurm_probe_seconds() -> float | None:
    """The Slurm executor plugin runs `scontrol show config` when Snakemake imports it; with the
    Slurm client installed but no controller running that waits for its 10 s timeout."""
    import shutil

    if not shutil.which("scontrol"):
        return None
    t0 = time.perf_counter()
    subprocess.run(["scontrol", "show", "config"], capture_output=True, timeout=30)
    return round(time.perf_counter() - t0, 2)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=int, default=10)
    ap.add_argument("--recipes", type=int, default=10)
    ap.add_argument("--benches", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "config.yaml"
        cfg.write_text(yaml.safe_dump(grid_config(args.models, args.recipes, args.benches)))
        cmd = [sys.executable, "-m", "snakemake", "-n", "--quiet", "rules", "--snakefile",
               str(ROOT / "workflow/Snakefile"), "--directory", tmp, "--configfile", str(cfg)]
        times, jobs = [], 0
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            times.append(time.perf_counter() - t0)
            jobs = int(re.search(r"^total\s+(\d+)", out.stdout, re.M).group(1))
    probe = slurm_probe_seconds()
    result = {
        "grid": f"{args.models} models x {args.recipes} recipes x {args.benches} benches",
        "jobs": jobs,
        "dry_run_seconds_best": round(min(times), 2),
        "dry_run_seconds_all": [round(t, 2) for t in times],
        "ms_per_job": round(1000 * min(times) / max(jobs, 1), 2),
        "slurm_plugin_probe_seconds": probe,
        "dry_run_seconds_best_without_probe": round(min(times) - (probe or 0), 2),
        "machine": f"{platform.processor() or platform.machine()}, {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
    }
    print(f"| grid | jobs | dry-run s (best of {args.repeats}) | of which Slurm plugin probe s | ms/job |\n"
          "|---|---:|---:|---:|---:|")
    print(f"| {result['grid']} | {jobs} | {result['dry_run_seconds_best']} | {probe or 0} | {result['ms_per_job']} |")
    out_dir = ROOT / "benchmarks/results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "dag_scale.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
