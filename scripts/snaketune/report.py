"""Step `plots`: the figures of the Snakemake report (PNG, matplotlib).

Reads the finished study and writes into ``--out``:

- ``loss.png``: the training loss per step of every training run, one panel per run (with the
  held-out loss of recipes that set ``eval_steps``);
- ``eval_scores.png``: every eval score across variants (base / SFT / aligned / quantized), one
  panel per (model, bench), the value written on each bar, the colours (base, trained, quantized)
  in a legend; a cell whose step failed is a FAILED label at zero;
- ``eval_table.html``: the same scores as a table, with exactly the numbers (and rounding) of
  ``results/summary.md``, so the report and the terminal summary agree, and under it the failed
  cells with their error and log;
- ``throughput_memory.png``: tokens/s and peak memory (max RSS of the Snakemake benchmark) per
  training run, and output tokens/s per serving run where serving benchmarks exist
  (``<model>/<variant>/serving/<engine>.json`` or ``serving*.json``);
- ``numbers.json``: every number drawn above, for tests and for the bundle.

Every number comes from a file the workflow wrote (``summary.json``, ``training.json``, benchmark
TSVs, serving JSON); nothing is recomputed.
"""

from __future__ import annotations

import argparse
import html
import json
import math
from pathlib import Path

from snaketune.atomic import atomic_file, write_json
from snaketune.errors import SnaketuneError, cli


def training_runs(train_dirs: list[str]) -> list[dict]:
    """One record per training output folder (training.json names its model and recipe and records
    its peak memory): name, loss per step, throughput, peak memory."""
    runs = []
    for folder in map(Path, train_dirs):
        info = folder / "training.json"
        if not info.is_file():
            raise SnaketuneError(f"{folder} has no training.json: is it the output of a train step?")
        t = json.loads(info.read_text())
        model, recipe = t["model"], t["recipe"]
        steps = [(h["step"], h["loss"]) for h in t.get("log_history", []) if "loss" in h]
        evals = [(h["step"], h["eval_loss"]) for h in t.get("log_history", []) if "eval_loss" in h]
        runs.append({
            "name": f"{model}/{recipe}",
            "stage": t.get("stage"),
            "train_type": t.get("train_type"),
            "steps": [s for s, _ in steps],
            "loss": [loss for _, loss in steps],
            "eval_steps": [s for s, _ in evals],  # the held-out loss of recipes with eval_steps
            "eval_loss": [loss for _, loss in evals],
            "final_loss": t.get("final_loss"),
            "tokens_per_s": t.get("tokens_per_s"),
            "seconds": t.get("wall_seconds"),
            "max_rss_mb": t.get("peak_rss_mb"),  # None in records written before it was recorded
        })
    return sorted(runs, key=lambda r: r["name"])


def serving_runs(paths: list[str]) -> list[dict]:
    """One record per serving benchmark JSON (serving_bench's, which names its model, variant and
    engine and measures its own peak memory): output tokens/s at each concurrency."""
    runs = []
    for path in sorted(paths):
        rec = json.loads(Path(path).read_text())
        levels = rec["levels"]
        runs.append({
            "name": f"{rec['model']}/{rec['variant']} ({rec['engine']})",
            "engine": rec["engine"],
            "concurrency": [lvl["concurrency"] for lvl in levels],
            "output_tokens_per_s": [lvl["output_tokens_per_s"] for lvl in levels],
            "max_rss_mb": rec["peak_rss_mb"],
        })
    return runs


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 100, "font.size": 10, "axes.grid": True, "grid.alpha": 0.3})
    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_file(path, "wb") as fh:  # no version stamp: same bytes for same data
        fig.savefig(fh, format="png", metadata={"Software": None})


def plot_loss(runs: list[dict], path: Path) -> None:
    plt = _plt()
    n = max(len(runs), 1)
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.6 * rows), squeeze=False)
    for ax, run in zip(axes.flat, runs):
        if run["steps"]:
            ax.plot(run["steps"], run["loss"], marker="o", markersize=3, label="training loss")
        else:
            ax.text(0.5, 0.5, "no loss logged", ha="center", va="center", transform=ax.transAxes)
        if run.get("eval_steps"):
            ax.plot(run["eval_steps"], run["eval_loss"], marker="s", markersize=4, color="#dd8452",
                    label="held-out loss (eval_steps)")
            ax.legend(loc="upper right", fontsize="small")
        ax.set_title(f"{run['name']} ({run['stage']}, {run['train_type']})")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
    for ax in list(axes.flat)[len(runs):]:
        ax.axis("off")
    if not runs:
        axes.flat[0].text(0.5, 0.5, "no training runs in this study", ha="center", va="center")
    _save(fig, path)
    plt.close(fig)


KINDS = {"base": "#9e9e9e", "trained": "#4c72b0", "quantized": "#dd8452"}  # legend -> colour


def variant_kind(variant: str) -> str:
    """The legend entry of a variant: ``base``, a recipe, or ``<base|recipe>/<quantize name>``."""
    return "base" if variant == "base" else "quantized" if "/" in variant else "trained"


def plot_scores(rows: list[dict], path: Path, failed: list[dict] = ()) -> None:
    """One bar panel per (model, bench); failed cells (with a metric: eval cells) read FAILED."""
    from matplotlib.patches import Patch

    plt = _plt()
    groups: dict[tuple, list[dict]] = {}
    for r in [*rows, *({**f, "score": None} for f in failed if f.get("metric"))]:
        groups.setdefault((r["model"], r["bench"], r["metric"]), []).append(r)
    n = max(len(groups), 1)
    fig, axes = plt.subplots(n, 1, figsize=(max(6, 1.4 * max((len(g) for g in groups.values()), default=1) + 4),
                                              3.8 * n), squeeze=False)
    for ax, ((model, bench, metric), group) in zip(axes.flat, groups.items()):
        names = [r["variant"] for r in group]
        scores = [r["score"] for r in group]
        kinds = [variant_kind(v) for v in names]
        bars = ax.bar(names, [s or 0 for s in scores], color=[KINDS[k] for k in kinds])
        ax.legend(handles=[Patch(color=c, label=k) for k, c in KINDS.items() if k in kinds], fontsize=8,
                  loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        for bar, s in zip(bars, scores):
            ax.annotate("FAILED" if s is None else f"{s:.3f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", xytext=(0, 2), textcoords="offset points",
                        color="#c44e52" if s is None else "black")
        ax.set_ylim(0, max(1.0, max((s for s in scores if s is not None), default=0) * 1.15))
        ax.set_title(f"{model} · {bench}")
        ax.set_ylabel(metric)
        ax.tick_params(axis="x", rotation=20)
    _save(fig, path)
    plt.close(fig)


def plot_throughput(train: list[dict], serving: list[dict], path: Path) -> None:
    plt = _plt()
    panels = 3 if serving else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), squeeze=False)
    names = [r["name"] for r in train]
    ax = axes[0, 0]
    ax.bar(names, [r["tokens_per_s"] or 0 for r in train], color="#4c72b0")
    ax.set_title("training throughput")
    ax.set_ylabel("tokens / s")
    ax = axes[0, 1]
    mem = [("train " + r["name"], r["max_rss_mb"]) for r in train] + [("serve " + r["name"], r["max_rss_mb"])
                                                                       for r in serving]
    ax.bar([m[0] for m in mem], [m[1] or 0 for m in mem], color="#55a868")
    ax.set_title("peak memory (max RSS)")
    ax.set_ylabel("MB")
    for a in axes[0, :2]:
        for label in a.get_xticklabels():
            label.set_rotation(25)
            label.set_horizontalalignment("right")
    if serving:
        ax = axes[0, 2]
        for r in serving:
            ax.plot(r["concurrency"], [v or 0 for v in r["output_tokens_per_s"]], marker="o", label=r["name"])
        ax.set_xticks(sorted({c for r in serving for c in r["concurrency"]}))
        ax.set_title("serving throughput")
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("output tokens / s")
        ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)


def score_table(rows: list[dict], summary_md: str | None, failed: list[dict] = ()) -> str:
    """The eval table as a small HTML page; the cells are summary.md's own cells when given. Failed
    cells are listed under it with their step, error and log."""
    if summary_md:
        lines = [ln for ln in summary_md.splitlines() if ln.startswith("|")]
        head = [c.strip() for c in lines[0].strip("|").split("|")]
        body = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]
    else:
        head = ["model", "variant", "bench", "metric", "score", "n", "size MB"]
        body = [[r["model"], r["variant"], r["bench"], r["metric"], f"{r['score']:.3f}", str(r["n"]),
                 f"{r['size_mb']:.2f}"] for r in rows]
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>\n" for row in body)
    notes = "".join(f"<li>{html.escape(' · '.join((f['model'], f['variant'], f['bench'])))}: "
                    f"{html.escape(f['step'] or 'not run')}: <code>{html.escape(f['error'])}</code>"
                    + (f" (log: <code>{html.escape(f['log'])}</code>)" if f.get("log") else "") + "</li>\n"
                    for f in failed)
    failures = f"<p>FAILED: {len(failed)} cell(s)</p>\n<ul>\n{notes}</ul>\n" if failed else ""
    return ("<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>eval scores</title><style>"
            "body{font-family:sans-serif}table{border-collapse:collapse}"
            "td,th{border:1px solid #bbb;padding:4px 10px}td:nth-child(n+5){text-align:right}"
            f"</style></head><body>\n<table>\n<tr>{th}</tr>\n{trs}</table>\n{failures}</body></html>\n")


def make_plots(summary_json: str, train_dirs: list[str], out: str, summary_md: str | None = None,
               serving_jsons: list[str] = ()) -> dict:
    summary = json.loads(Path(summary_json).read_text())
    rows, failed = summary["rows"], summary.get("failed", [])
    train = training_runs(train_dirs)
    serving = serving_runs(serving_jsons)
    md = Path(summary_md).read_text() if summary_md and Path(summary_md).is_file() else None
    numbers = {
        "eval": [{k: r[k] for k in ("model", "variant", "bench", "metric", "score", "n", "size_mb")} for r in rows],
        "training": train,
        "serving": serving,
        "failed": failed,
    }
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_loss(train, out_dir / "loss.png")
    plot_scores(rows, out_dir / "eval_scores.png", failed)
    plot_throughput(train, serving, out_dir / "throughput_memory.png")
    with atomic_file(out_dir / "eval_table.html") as fh:
        fh.write(score_table(rows, md, failed))
    write_json(out_dir / "numbers.json", numbers)
    return numbers


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m snaketune.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--summary", required=True, help="results/summary.json")
    ap.add_argument("--summary-md", help="results/summary.md (the table cells are copied from it)")
    ap.add_argument("--train", nargs="*", default=[], help="training output folders (with training.json)")
    ap.add_argument("--serving", nargs="*", default=[], help="serving benchmark JSON files (serving_bench's)")
    ap.add_argument("--out", required=True, help="output folder for the figures")
    args = ap.parse_args(argv)
    from snaketune.tracking import step_run

    with step_run("plots", {"train_runs": len(args.train)}) as run:
        numbers = make_plots(args.summary, args.train, args.out, args.summary_md, args.serving)
        for name in ("loss.png", "eval_scores.png", "throughput_memory.png"):
            run.log_artifact(Path(args.out) / name, "plots")
    print(f"plots: {len(numbers['training'])} training runs, {len(numbers['eval'])} eval scores, "
          f"{len(numbers['serving'])} serving runs, {len(numbers['failed'])} failed cells -> {args.out}")


if __name__ == "__main__":
    main()
