"""Step `summary`: join every eval JSON (and serving benchmark) into one table and one JSON.

One row per (model, variant, bench): score, sample count, model size on disk, where the variant
is quantized its method, and where it was served its throughput and time to first token at the
highest concurrency measured. The Markdown table is what the workflow prints at the end.

After a failed run the workflow's ``onerror`` handler calls this step over the cells that exist,
with ``--failed`` naming the missing ones: each becomes a FAILED row, listed under the table with
the first error line of the step that failed on its way and that step's log.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from snaketune.atomic import atomic_file, write_json
from snaketune.errors import cli
from snaketune.files import folder_size


def row_for(eval_path: str) -> dict:
    """One summary row from an eval JSON (its model, variant and bench are its own fields)."""
    record = json.loads(Path(eval_path).read_text())
    model_dir = Path(record["model_path"])
    quant = model_dir / "quantization.json"
    return {
        "model": record["model"],
        "variant": record["variant"],
        "bench": record["bench"],
        "metric": record["metric"],
        "score": record["score"],
        "n": record["n"],
        "size_mb": round(folder_size(model_dir) / 1e6, 2),
        "quantization": json.loads(quant.read_text()).get("method") if quant.is_file() else None,
        "model_path": record["model_path"],
        "model_sha256": record.get("model_sha256"),
        "eval_json": str(eval_path),
    }


def serving_for(path: str) -> tuple[tuple[str, str], dict]:
    """((model, variant) it served, figures at the highest concurrency) from a serving benchmark JSON."""
    record = json.loads(Path(path).read_text())
    top = max(record["levels"], key=lambda level: level["concurrency"])
    return (record["model"], record["variant"]), {
        "engine": record["engine"],
        "concurrency": top["concurrency"],
        "output_tokens_per_s": top["output_tokens_per_s"],
        "requests_per_s": top["requests_per_s"],
        "ttft_p50_ms": top["ttft_ms"]["p50"],
        "errors": sum(level["errors"] for level in record["levels"]),
        "serving_json": str(path),
    }


_EXCEPTION = re.compile(r"[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b")


def first_error(log: str | None) -> str:
    """What went wrong, from a failed step's log: its own ``snaketune: error:`` line, else the last
    exception line of a traceback, else the log's last line."""
    if not log or not Path(log).is_file():
        return "no log: Snakemake's own log says why the job failed"
    lines = [ln.strip() for ln in Path(log).read_text(errors="replace").splitlines() if ln.strip()]
    ours = next((ln for ln in lines if ln.startswith("snaketune: error:")), None)
    raised = [ln for ln in lines if _EXCEPTION.match(ln)]
    line = ours or (raised or lines or ["the log is empty (killed, e.g. out of memory?)"])[-1]
    return line if len(line) <= 1000 else line[:999] + "…"


def failed_cell(cell: dict) -> dict:
    """A missing cell (model, variant, bench, metric, the failed step and its log) with its error."""
    if cell.get("step") is None:
        return {**cell, "error": "not run: the run stopped before it"}
    return {**cell, "error": first_error(cell.get("log"))}


def _cell(value, fmt):
    return format(value, fmt) if value is not None else "–"


def _line(r: dict) -> str:
    if "error" in r:
        return (f"| {r['model']} | {r['variant']} | {r['bench']} | {r.get('metric') or '–'} | "
                f"FAILED ({r['step'] or 'not run'}) | – | – | – | – | – |\n")
    return (f"| {r['model']} | {r['variant']} | {r['bench']} | {r['metric']} | {r['score']:.3f} | {r['n']} | "
            f"{r['size_mb']:.2f} | {r['quantization'] or '–'} | "
            f"{_cell((r.get('serving') or {}).get('output_tokens_per_s'), '.0f')} | "
            f"{_cell((r.get('serving') or {}).get('ttft_p50_ms'), '.1f')} |\n")


def markdown(rows: list[dict], failed: list[dict] = ()) -> str:
    """The summary as a Markdown table; failed cells are rows of their own, explained below it."""
    head = ("| model | variant | bench | metric | score | n | size MB | quant | serve tok/s | TTFT p50 ms |\n"
            "|---|---|---|---|---:|---:|---:|---|---:|---:|\n")
    body = "".join(map(_line, sorted([*rows, *failed], key=lambda r: (r["model"], r["bench"], r["variant"]))))
    if not failed:
        return head + body
    notes = "".join(f"- {f['model']} · {f['variant']} · {f['bench']}: {f['step'] or 'not run'}: {f['error']}"
                    + (f" (log: {f['log']})" if f.get("log") else "") + "\n" for f in failed)
    return (head + body + f"\nFAILED: {len(failed)} cell(s), each with the step that failed on its way; fix it "
            "and run the same command again (finished steps are kept):\n" + notes)


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m snaketune.summary", description=__doc__)
    ap.add_argument("--evals", nargs="*", default=[], help="eval JSON files")
    ap.add_argument("--serving", nargs="*", default=[], help="serving benchmark JSON files")
    ap.add_argument("--failed", default="[]",
                    help="JSON list of missing cells: model, variant, bench, metric, step (the rule that "
                         "failed on its way, null if none ran) and log (its log file)")
    ap.add_argument("--out-json", required=True)
    ap.add_argument("--out-md", required=True)
    args = ap.parse_args(argv)
    from snaketune.tracking import step_run

    rows = sorted((row_for(p) for p in args.evals), key=lambda r: (r["model"], r["bench"], r["variant"]))
    failed = [failed_cell(c) for c in json.loads(args.failed)]
    serving = dict(serving_for(p) for p in args.serving)
    for r in rows:
        r["serving"] = serving.get((r["model"], r["variant"]))
    with step_run("summary", {"evals": len(rows), "failed": len(failed)}) as run:
        write_json(args.out_json, {"rows": rows, "failed": failed})
        table = markdown(rows, failed)
        with atomic_file(args.out_md) as fh:
            fh.write(table)
        for r in rows:
            key = f"{r['model']}.{r['variant'].replace('/', '.')}"
            run.log_metrics({f"{key}.{r['bench']}.{r['metric']}": r["score"], f"{key}.size_mb": r["size_mb"]})
            if r["serving"]:
                run.log_metrics({f"{key}.serve_output_tokens_per_s": r["serving"]["output_tokens_per_s"]})
        run.log_artifact(args.out_json)
        run.log_artifact(args.out_md)
    print(table)


if __name__ == "__main__":
    main()
