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
    python benchmarks/robustness.py --demo                # the demo study itself (config.yaml), as users run it

``--demo`` runs ``snakemake`` on config.yaml (its ``seed`` set) up to the held-out evaluation of
base, pt and sft-lora, one Snakemake job at a time, and records the sft-lora score against the
demo test's bound. Runs already in the JSON that this call does not repeat are kept (a ``-k``
selection's runs are cells of their own, named by ``pytest_k``).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from snaketune.bundle import cpu_model  # noqa: E402
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
    return {"capability": cap, "mkl_cbwr": mkl, "seed": seed, **({"pytest_k": keyword} if keyword else {}),
            "records": records, "pytest": tail, "passed": result.returncode == 0, "seconds": round(time.time() - t0)}


def run_demo(cap: str, mkl: str, seed: int) -> dict:
    """The demo study (config.yaml with ``seed``) through Snakemake to its held-out evaluations."""
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        config = yaml.safe_load((ROOT / "config.yaml").read_text())
        (Path(tmp) / "config.yaml").write_text(yaml.safe_dump({**config, "seed": seed}, sort_keys=False))
        env = {k: v for k, v in os.environ.items() if k not in ("SNAKETUNE_TRACKING", "MLFLOW_TRACKING_URI")}
        env.update({"ATEN_CPU_CAPABILITY": cap, "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"})
        if mkl != "AUTO":
            env["MKL_CBWR"] = mkl
        targets = [f"results/tiny-qwen2/{v}/eval/arith.json" for v in ("base", "pt", "sft-lora")]
        t0 = time.time()
        result = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "workflow/Snakefile"),
                                 "--directory", tmp, "--configfile", f"{tmp}/config.yaml", "--cores", "1", *targets],
                                cwd=tmp, env=env, capture_output=True, text=True)
        scores = {}
        for t in targets:
            path = Path(tmp) / t
            if path.is_file():
                scores[t.split("/")[2]] = json.loads(path.read_text())["score"]
    records = [{"test": "demo sft-lora held-out exact match", "value": scores["sft-lora"], "bound": 0.5}] \
        if "sft-lora" in scores else []
    return {"kind": "demo", "capability": cap, "mkl_cbwr": mkl, "seed": seed, "records": records, "scores": scores,
            "pytest": "ok" if result.returncode == 0 else result.stderr[-300:], "passed": bool(records) and
            records[0]["value"] >= 0.5 and scores.get("base", 1) <= 0.02 and scores.get("pt", 1) <= 0.05,
            "seconds": round(time.time() - t0)}


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
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time")
    ap.add_argument("--demo", action="store_true", help="run the demo study itself instead of pytest -m learning")
    ap.add_argument("--out", type=Path, default=OUT, help=f"the JSON to update (default {OUT.relative_to(ROOT)}; "
                    "one per machine keeps machines apart)")
    args = ap.parse_args()
    caps = args.caps or machine_caps()
    grid = [(c, m, s) for c in caps for m in args.mkl for s in args.seeds]
    runs = []
    with cf.ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_demo, *g) if args.demo else pool.submit(run_one, *g, args.select, args.keyword)
                   for g in grid]
        for fut in cf.as_completed(futures):
            run = fut.result()
            runs.append(run)
            print(f"{run['capability']}/{run['mkl_cbwr']}/seed {run['seed']}: {run['pytest']} ({run['seconds']} s)",
                  flush=True)
    kind = "demo" if args.demo else "pytest"
    for run in runs:
        run.setdefault("kind", kind)
    cell = lambda r: (r.get("kind", "pytest"), r.get("pytest_k", ""), r["capability"], r["mkl_cbwr"], r["seed"])  # noqa: E731
    rerun = {cell(r) for r in runs}  # a run of one selection (-k) replaces only that selection's cells
    kept = [r for r in json.loads(args.out.read_text())["runs"] if cell(r) not in rerun] if args.out.is_file() else []
    runs = sorted(kept + runs, key=cell)
    report = {"date": time.strftime("%Y-%m-%d"), "machine": cpu_model(), "native": machine_caps()[-1], "runs": runs}
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(table(runs))
    sys.exit(0 if all(r["passed"] for r in runs) else 1)


if __name__ == "__main__":
    main()
