"""Step `summary`: join every eval JSON into one table (Markdown) and one JSON.

One row per (model, variant, bench): score, sample count, model size on disk and, where the
variant is quantized, its method. The Markdown table is what the workflow prints at the end.
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
        "model_sha256": record.get("model_sha256"),
        "eval_json": str(eval_path),
    }


def markdown(rows: list[dict]) -> str:
    """The summary as a Markdown table."""
    head = "| model | variant | bench | metric | score | n | size MB |\n|---|---|---|---|---:|---:|---:|\n"
    body = "".join(
        f"| {r['model']} | {r['variant']} | {r['bench']} | {r['metric']} | {r['score']:.3f} | {r['n']} | "
        f"{r['size_mb']:.2f} |\n"
        for r in rows
    )
    return head + body


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m snaketune.summary", description=__doc__)
    ap.add_argument("--evals", nargs="+", required=True, help="eval JSON files")
    ap.add_argument("--out-json", required=True)
    ap.add_argument("--out-md", required=True)
    args = ap.parse_args(argv)
    from snaketune.tracking import step_run

    rows = sorted((row_for(p) for p in args.evals), key=lambda r: (r["model"], r["bench"], r["variant"]))
    with step_run("summary", {"evals": len(rows)}) as run:
        write_json(args.out_json, {"rows": rows})
        table = markdown(rows)
        with atomic_file(args.out_md) as fh:
            fh.write(table)
        for r in rows:
            key = f"{r['model']}.{r['variant'].replace('/', '.')}.{r['bench']}.{r['metric']}"
            run.log_metrics({key: r["score"]})
        run.log_artifact(args.out_json)
        run.log_artifact(args.out_md)
    print(table)


if __name__ == "__main__":
    main()
