"""Step `summary`: join every eval JSON (and serving benchmark) into one table and one JSON.

One row per (model, variant, bench): score, sample count, model size on disk, where the variant
is quantized its method, and where it was served its throughput and time to first token at the
highest concurrency measured. The Markdown table is what the workflow prints at the end.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from snaketune.atomic import atomic_file, write_json
from snaketune.errors import cli


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def row_for(eval_path: str) -> dict:
    """One summary row from an eval JSON at ``results/<model>/<variant>/eval/<bench>.json``."""
    record = json.loads(Path(eval_path).read_text())
    parts = Path(eval_path).parts
    model = parts[-4 - record.get("variant", "").count("/")]
    model_dir = Path(record["model_path"])
    quant = model_dir / "quantization.json"
    return {
        "model": model,
        "variant": record.get("variant", ""),
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


def serving_for(path: str) -> tuple[str, dict]:
    """(served model folder, figures at the highest concurrency) from a serving benchmark JSON."""
    record = json.loads(Path(path).read_text())
    top = max(record["levels"], key=lambda level: level["concurrency"])
    return str(Path(record["model"]).resolve()), {
        "engine": record["engine"],
        "concurrency": top["concurrency"],
        "output_tokens_per_s": top["output_tokens_per_s"],
        "requests_per_s": top["requests_per_s"],
        "ttft_p50_ms": top["ttft_ms"]["p50"],
        "errors": sum(level["errors"] for level in record["levels"]),
        "serving_json": str(path),
    }


def _cell(value, fmt):
    return format(value, fmt) if value is not None else "–"


def markdown(rows: list[dict]) -> str:
    """The summary as a Markdown table."""
    head = ("| model | variant | bench | metric | score | n | size MB | quant | serve tok/s | TTFT p50 ms |\n"
            "|---|---|---|---|---:|---:|---:|---|---:|---:|\n")
    body = "".join(
        f"| {r['model']} | {r['variant']} | {r['bench']} | {r['metric']} | {r['score']:.3f} | {r['n']} | "
        f"{r['size_mb']:.2f} | {r['quantization'] or '–'} | "
        f"{_cell((r.get('serving') or {}).get('output_tokens_per_s'), '.0f')} | "
        f"{_cell((r.get('serving') or {}).get('ttft_p50_ms'), '.1f')} |\n"
        for r in rows
    )
    return head + body


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m snaketune.summary", description=__doc__)
    ap.add_argument("--evals", nargs="+", required=True, help="eval JSON files")
    ap.add_argument("--serving", nargs="*", default=[], help="serving benchmark JSON files")
    ap.add_argument("--out-json", required=True)
    ap.add_argument("--out-md", required=True)
    args = ap.parse_args(argv)
    from snaketune.tracking import step_run

    rows = sorted((row_for(p) for p in args.evals), key=lambda r: (r["model"], r["bench"], r["variant"]))
    serving = dict(serving_for(p) for p in args.serving)
    for r in rows:
        r["serving"] = serving.get(str(Path(r["model_path"]).resolve()))
    with step_run("summary", {"evals": len(rows)}) as run:
        write_json(args.out_json, {"rows": rows})
        table = markdown(rows)
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
