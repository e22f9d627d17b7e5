"""The stage table of a GPU end-to-end run (benchmarks/gpu_e2e.sh): one row per Snakemake job.

    python3 benchmarks/gpu_e2e_table.py RUN_DIR --out benchmarks/results/DATE-h200-e2e

RUN_DIR holds what gpu_e2e.sh wrote into $OUT: snakemake.log (the console), gpumem.csv (nvidia-smi
every 0.25 s), env.txt and results.tgz (logs, benchmark TSVs, every small JSON). Per job: wall
seconds (Snakemake's benchmark TSV, the job's whole command), the GPU's peak memory while the job
ran (nvidia-smi's memory.used: every process on the GPU, the CUDA context and PyTorch's cache
included; GPU jobs run one at a time, so the peak is that job's), for training also PyTorch's peak
allocation and the steady-state tokens/s of training.json, for evaluation samples/s of generation,
and the job's result. Writes OUT.md and OUT.json.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import re
import tarfile
from pathlib import Path

STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")
RULE = re.compile(r"^(?:local)?rule (\w+):$")


def parse_console(text: str) -> dict[int, dict]:
    """jobid -> {rule, start, end, benchmark, output, log, failed} from Snakemake's console."""
    jobs, now, pending = {}, None, None
    for line in text.splitlines():
        line = line.rstrip()
        if m := STAMP.match(line):
            now = dt.datetime.strptime(" ".join(m.group(1).split()), "%a %b %d %H:%M:%S %Y")
            continue
        if m := RULE.match(line):
            pending = {"rule": m.group(1), "start": now}
            continue
        if pending is not None and line.startswith("    "):  # the job's block: output, log, jobid, benchmark, ...
            key, _, value = line.strip().partition(": ")
            if key in ("output", "benchmark", "log", "wildcards"):
                pending[key] = value.split(", ")[0] if key != "wildcards" else value
            elif key == "jobid":
                pending.update(end=None, failed=False)
                jobs[int(value)] = pending  # the same dict: keys after jobid (benchmark) land in it too
            continue
        pending = None
        if m := re.match(r"^Finished jobid: (\d+)", line.strip()):
            jobs.get(int(m.group(1)), {})["end"] = now
        elif m := re.match(r"^Error in rule (\w+):", line.strip()):
            for job in jobs.values():
                if job["rule"] == m.group(1) and job["end"] is None:
                    job["failed"] = True
    return jobs


def gpu_samples(path: Path) -> list[tuple[dt.datetime, float]]:
    out = []
    if not path.is_file():
        return out
    for row in csv.reader(path.read_text().splitlines()):
        try:
            stamp = dt.datetime.strptime(row[0].strip(), "%Y/%m/%d %H:%M:%S.%f")
            out.append((stamp, float(row[1]) / 1024))
        except (ValueError, IndexError):
            continue
    return out


def peak(samples, start, end) -> float | None:
    if start is None or end is None:
        return None
    inside = [gib for t, gib in samples if start <= t <= end + dt.timedelta(seconds=1)]
    return max(inside) if inside else None


def wall(results: Path, tsv: str | None) -> float | None:
    path = results.parent / tsv if tsv else None
    if not path or not path.is_file():
        return None
    rows = list(csv.DictReader(path.read_text().splitlines(), delimiter="\t"))
    return float(rows[0]["s"]) if rows else None


def describe(job: dict, results: Path) -> dict:
    """Throughput and result of one job from the files it wrote."""
    out = results.parent / job.get("output", "")
    rule, row = job["rule"], {}
    if rule in ("train_full", "train_adapter"):
        info = out / "training.json"
        if info.is_file():
            t = json.loads(info.read_text())
            row["rate"] = f"{t['tokens_per_s']:,.0f} tok/s" if t.get("tokens_per_s") else None
            row["torch_peak_gib"] = t.get("gpu_peak_gib")
            loss = (f"loss {t['first_loss']:.3f} -> {t['final_loss']:.3f}"
                    if t.get("first_loss") is not None and t.get("final_loss") is not None else "")
            row["result"] = (f"{t.get('stage')}/{t.get('train_type')} {t.get('steps')} steps, {loss}; warm-up "
                             f"{t.get('warmup_seconds') or 0:.0f} s, train() {t.get('wall_seconds') or 0:.0f} s")
            row["training"] = {k: t.get(k) for k in ("tokens_per_s", "warmup_seconds", "wall_seconds", "steps",
                                                     "first_loss", "final_loss", "gpu_peak_gib", "tokens",
                                                     "speedups", "data")}
    elif rule == "evaluate" and out.is_file():
        e = json.loads(out.read_text())
        row["rate"] = f"{e['n'] / e['seconds']:.1f} samples/s" if e.get("seconds") else None
        row["result"] = f"{e['metric']} {e['score']:.3f} (n {e['n']})"
    elif rule == "quantize" and (out / "quantization.json").is_file():
        q = json.loads((out / "quantization.json").read_text())
        row["result"] = (f"{q['method']}: {q['size_bytes'] / 1e9:.2f} GB (was {q['source_size_bytes'] / 1e9:.2f}), "
                         f"{q.get('library')} {q.get('library_version')}")
    elif rule == "merge_adapter" and (out / "merge.json").is_file():
        m = json.loads((out / "merge.json").read_text())
        row["result"] = f"max logit diff {m['max_logit_diff']:.2e} ({m.get('dtype')})"
    elif rule == "fetch_model" and (out / "source.json").is_file():
        s = json.loads((out / "source.json").read_text())
        cfg = json.loads((out / "config.json").read_text()) if (out / "config.json").is_file() else {}
        row["result"] = (f"{s['source']} {cfg.get('hidden_size')}x{cfg.get('num_hidden_layers')}, vocab "
                         f"{cfg.get('vocab_size')}, {cfg.get('dtype', cfg.get('torch_dtype'))}")
    elif rule == "serving_bench" and out.is_file():
        levels = json.loads(out.read_text())["levels"]
        row["rate"] = ", ".join(f"c{lv['concurrency']} {lv['output_tokens_per_s']:.1f}" for lv in levels) + " out tok/s"
        row["result"] = "; ".join(f"c{lv['concurrency']}: {lv['completed']}/{lv['requests']} ok, TTFT p50 "
                                  f"{lv['ttft_ms']['p50']:.0f} ms, TPOT p50 {lv['tpot_ms']['p50']:.1f} ms"
                                  for lv in levels)
    elif rule == "prepare_data" and (out / "manifest.json").is_file():
        rows = json.loads((out / "manifest.json").read_text())["rows"]
        row["result"] = ", ".join(f"{k} {v}" for k, v in rows.items() if v)
    if job["failed"]:
        row["result"] = "FAILED (log: " + job.get("log", "?") + ")"
    elif job["end"] is None:
        row["result"] = "did not finish"
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--out", required=True, help="path without suffix: writes .md and .json")
    args = ap.parse_args(argv)
    run = args.run_dir
    unpacked = run / "unpacked"
    if (run / "results.tgz").is_file() and not unpacked.exists():
        with tarfile.open(run / "results.tgz") as tar:
            tar.extractall(unpacked, filter="data")
    results = unpacked / "results"
    jobs = parse_console((run / "snakemake.log").read_text())
    samples = gpu_samples(run / "gpumem.csv")
    rows = []
    for jobid, job in sorted(jobs.items(), key=lambda kv: (kv[1]["start"] or dt.datetime.max, kv[0])):
        if job["rule"] == "all":
            continue
        name = job.get("output", "").removeprefix("results/")
        rows.append({"job": job["rule"], "target": name, "start": job["start"].isoformat() if job["start"] else None,
                     "wall_s": wall(results, job.get("benchmark")), "gpu_peak_gib": peak(samples, job["start"], job["end"]),
                     **describe(job, results)})
    lines = ["| stage | target | wall s | GPU peak GiB (nvidia-smi / torch) | tok/s or samples/s | result |",
             "|---|---|---:|---:|---:|---|"]
    for r in rows:
        gpu = "" if r["gpu_peak_gib"] is None else f"{r['gpu_peak_gib']:.1f}"
        if r.get("torch_peak_gib") is not None:
            gpu += f" / {r['torch_peak_gib']:.1f}"
        secs = "" if r["wall_s"] is None else f"{r['wall_s']:.1f}"
        lines.append(f"| {r['job']} | {r['target']} | {secs} | {gpu} | {r.get('rate') or ''} | {r.get('result', '')} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    env = (run / "env.txt").read_text() if (run / "env.txt").is_file() else ""
    Path(f"{args.out}.json").write_text(json.dumps({"env": env, "jobs": rows}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
