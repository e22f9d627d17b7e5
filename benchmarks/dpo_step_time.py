"""DPO step time side by side with ms-swift: the parity study's DPO, paired and alternating.

From the same full-SFT start model (each system's own, made by ``benchmarks/parity.py`` for seed 0)
and the same pairs, each pair of runs is

- snaketune: the workflow's own job, ``snakemake --force results/tiny/dpo/model`` in the parity
  folder ``snaketune-TAG-s0`` (the rule's command and the study's resolved recipe: 50 steps, batch
  32, one thread), timed by training.json (``wall_seconds``: the whole ``trainer.train()``; and the
  steady state after the warm-up steps);
- ms-swift: the shared ``swift rlhf`` line (``OMP_NUM_THREADS=1``), timed by its ``train_runtime``
  (the whole ``trainer.train()``).

Both are seconds per optimizer step of ``trainer.train()``; process start, model loading and data
encoding are outside both. The machine is a shared VM, so runs alternate and the table gives
medians and every value.

    python benchmarks/parity.py --work /tmp/par --seeds 0 --steps dpo --swift /path/to/venv/bin/swift --tag T
    python benchmarks/dpo_step_time.py --work /tmp/par --tag T --swift /path/to/venv/bin/swift --pairs 5

Writes benchmarks/results/dpo_step_time.json (appends one record per call) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from parity import ROOT, capability, swift_commands, swift_runtime  # noqa: E402

RESULTS = ROOT / "benchmarks/results/dpo_step_time.json"


def snaketune_once(folder: Path) -> dict:
    """Rerun the study's DPO job with Snakemake (only it: upstream jobs are not rerun for changed
    params); its training.json's per-step times."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "workflow/Snakefile"), "--directory",
           str(folder), "--configfile", str(folder / "config.yaml"), "--cores", "1", "--config", "seed=0",
           "--force", "--rerun-triggers", "mtime", "--", "results/tiny/dpo/model"]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "SNAKETUNE_TRACKING")}
    shutil.rmtree(folder / "results/tiny/dpo/checkpoints", ignore_errors=True)  # else it resumes at step 50
    subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=folder)
    t = json.loads((folder / "results/tiny/dpo/model/training.json").read_text())
    assert t["resumed_from"] is None and t["steps"] == 50, t
    return {"s_per_step": t["wall_seconds"] / t["steps"],
            "steady_s_per_step": t["steady_seconds"] / t["steady_steps"],
            "logprob_head": t.get("logprob_head"), "final_loss": t["final_loss"]}


def swift_once(folder: Path, swift: str, shared: Path) -> dict:
    """The shared ``swift rlhf`` DPO line from the seed's full-SFT checkpoint; train_runtime per step."""
    line = swift_commands(shared, 0, "out")["dpo"].replace("out/dpo_full", "out/dpo_full_timing")
    log = folder / "dpo_timing.log"
    with open(log, "w") as fh:
        subprocess.run([swift, *shlex.split(line)[1:]], check=True, stdout=fh, stderr=subprocess.STDOUT,
                       cwd=folder, env={**os.environ, "OMP_NUM_THREADS": "1"})
    runtime, steps = swift_runtime(log.read_text())
    return {"s_per_step": runtime / steps}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared/parity")
    ap.add_argument("--work", type=Path, required=True, help="the parity.py work folder (seed 0 run of both)")
    ap.add_argument("--tag", required=True, help="the snaketune run's tag in parity.py (folder snaketune-TAG-s0)")
    ap.add_argument("--swift", default="swift")
    ap.add_argument("--pairs", type=int, default=5)
    args = ap.parse_args()
    work, shared = args.work.resolve(), args.shared.resolve()
    ours, theirs = work / f"snaketune-{args.tag}-s0", work / "swift-s0"
    for need in (ours / "results/tiny/sft-full/model", theirs / "out/sft_full/checkpoint-1000"):
        if not need.exists():
            sys.exit(f"{need} is missing: run benchmarks/parity.py --work {work} --seeds 0 --steps dpo "
                     f"--tag {args.tag} first")
    rows = {"snaketune": [], "ms-swift": []}
    for i in range(args.pairs):
        first, second = (("snaketune", "ms-swift") if i % 2 == 0 else ("ms-swift", "snaketune"))
        for system in (first, second):
            r = snaketune_once(ours) if system == "snaketune" else swift_once(theirs, args.swift, shared)
            rows[system].append(r)
            print(f"pair {i + 1} {system}: {r['s_per_step']:.4f} s/step", flush=True)
    med = {k: statistics.median(r["s_per_step"] for r in v) for k, v in rows.items()}
    record = {"date": time.strftime("%Y-%m-%d %H:%M"), "capability": capability(),
              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "tag": args.tag,
              "median_s_per_step": med, "ratio": med["snaketune"] / med["ms-swift"], "runs": rows}
    previous = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    RESULTS.write_text(json.dumps(previous + [record], indent=1) + "\n")
    print("| system | s/step per run (trainer.train() / steps) | median |\n|---|---|---:|")
    for k, v in rows.items():
        each = " / ".join(f"{r['s_per_step']:.4f}" for r in v)
        print(f"| {k} | {each} | {med[k]:.4f} |")
    steady = [r["steady_s_per_step"] for r in rows["snaketune"]]
    print(f"snaketune steady state (after warm-up): median {statistics.median(steady):.4f} s/step; "
          f"ratio of medians snaketune / ms-swift: {record['ratio']:.3f}")


if __name__ == "__main__":
    main()
