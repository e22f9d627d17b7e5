"""Do the learning outcomes hold on any machine? The learning tests (and with them the demo study,
which `test_sft_learns_what_base_cannot` runs through the workflow) under each CPU capability
and several seeds.

Tiny-model training is chaotic: another CPU's kernels (AVX-512 vs AVX2 vs plain, Intel vs AMD
code paths in MKL) round differently and the same seed can learn a different model. This runs
`pytest -m learning` once per (capability, MKL code path, seed) with

    ATEN_CPU_CAPABILITY=<cap>  MKL_CBWR=<path>  SNAKETUNE_LEARNING_SEED=<seed>

and collects what each learning test records (value and the bound it must beat, see
tests/conftest.py `record_learning`). It prints, per test, every value, the smallest margin to
its bound, and writes benchmarks/results/robustness.json.

    python benchmarks/robustness.py                       # seeds 0-2 x every capability this CPU has
    python benchmarks/robustness.py --seeds 0 --caps default --mkl AUTO COMPATIBLE
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks/results/robustness.json"
ORDER = ("default", "avx2", "avx512")


def machine_caps() -> list[str]:
    """The capabilities this CPU can run, from plain up to its own (ATen's order)."""
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                         capture_output=True, text=True, check=True, env={**os.environ, "ATEN_CPU_CAPABILITY": ""})
    native = out.stdout.strip().lower()
    native = "avx512" if native.startswith("avx512") else native
    return list(ORDER[: ORDER.index(native) + 1]) if native in ORDER else ["default", native]


def run_one(cap: str, mkl: str, seed: int, select: str, keyword: str) -> dict:
    """One `pytest -m learning` run; its recorded outcomes and pass/fail."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "learning.jsonl"
        env = {**os.environ, "ATEN_CPU_CAPABILITY": cap, "SNAKETUNE_LEARNING_SEED": str(seed),
               "SNAKETUNE_LEARNING_LOG": str(log)}
        if mkl != "AUTO":
            env["MKL_CBWR"] = mkl
        t0 = time.time()
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", select,
                                 "-k", keyword, "--durations=0"], cwd=ROOT, env=env, capture_output=True, text=True)
        records = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    tail = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-300:]
    return {"capability": cap, "mkl_cbwr": mkl, "seed": seed, "records": records, "pytest": tail,
            "passed": result.returncode == 0, "seconds": round(time.time() - t0)}


def table(runs: list[dict]) -> str:
    by_test: dict[str, list[tuple[str, float, float]]] = {}
    for run in runs:
        label = f"{run['capability']}/{run['mkl_cbwr']}/s{run['seed']}"
        for r in run["records"]:
            by_test.setdefault(r["test"], []).append((label, r["value"], r["bound"]))
    lines = ["| learning test | bound | min | max | smallest margin | runs |", "|---|---:|---:|---:|---:|---|"]
    for test, rows in sorted(by_test.items()):
        values = [v for _, v, _ in rows]
        bound = rows[0][2]
        lines.append(f"| {test} | {bound:g} | {min(values):.3f} | {max(values):.3f} | {min(values) - bound:+.3f} | "
                     + ", ".join(f"{label} {v:.3f}" for label, v, _ in rows) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--caps", nargs="+", help="ATEN_CPU_CAPABILITY values (default: every one this CPU has)")
    ap.add_argument("--mkl", nargs="+", default=["AUTO"], help="MKL_CBWR code paths (AUTO = MKL's own choice)")
    ap.add_argument("-m", dest="select", default="learning", help="pytest marker expression")
    ap.add_argument("-k", dest="keyword", default="", help="pytest keyword expression (e.g. one test)")
    ap.add_argument("--jobs", type=int, default=1, help="pytest runs at a time (each uses both cores)")
    args = ap.parse_args()
    caps = args.caps or machine_caps()
    grid = [(c, m, s) for c in caps for m in args.mkl for s in args.seeds]
    runs = []
    with cf.ThreadPoolExecutor(args.jobs) as pool:
        for fut in cf.as_completed([pool.submit(run_one, *g, args.select, args.keyword) for g in grid]):
            run = fut.result()
            runs.append(run)
            print(f"{run['capability']}/{run['mkl_cbwr']}/seed {run['seed']}: {run['pytest']} ({run['seconds']} s)",
                  flush=True)
    runs.sort(key=lambda r: (r["capability"], r["mkl_cbwr"], r["seed"]))
    report = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
              "native": machine_caps()[-1], "runs": runs}
    OUT.write_text(json.dumps(report, indent=1) + "\n")
    print(table(runs))
    sys.exit(0 if all(r["passed"] for r in runs) else 1)


if __name__ == "__main__":
    main()
