"""The Snakemake report: `snakemake --report report.html plots` builds one self-contained HTML file
holding the figures of the `plots` rule; its numbers are the terminal summary's numbers; and it
renders in a real headless browser (Debian's chromium; install with ci/chromium.sh)."""

import base64
import json
import os
import re
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from snaketune import report as report_module
from snaketune.report import plot_scores, score_table
from conftest import snakemake
from test_determinism import MODEL

FIGURES = ("loss.png", "eval_scores.png", "throughput_memory.png")


# ------------------------------------------------------------------------------------- fast

class _Cells(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows, self._cell = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.rows[-1].append(self._cell.strip())
            self._cell = None


def html_cells(text: str) -> list[list[str]]:
    parser = _Cells()
    parser.feed(text)
    return parser.rows


def md_cells(text: str) -> list[list[str]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines[:1] + lines[2:]]


def test_score_table_copies_the_summary_cells():
    md = ("| model | variant | bench | metric | score | n | size MB |\n|---|---|---|---|---:|---:|---:|\n"
          "| m | base | b | exact_match | 0.125 | 8 | 1.00 |\n| m | x/<q> | b | exact_match | 1.000 | 8 | 0.50 |\n")
    assert html_cells(score_table([], md)) == md_cells(md)


def test_score_chart_has_a_legend_of_the_variant_kinds(tmp_path, monkeypatch):
    """Each panel's legend names the colours of the variants it shows: base, trained, quantized."""
    drawn = []
    monkeypatch.setattr(report_module, "_save", lambda fig, path: drawn.append(fig))
    rows = [{"model": "m", "bench": b, "metric": "exact_match", "variant": v, "score": 0.5}
            for b, variants in (("arith", ["base", "sft-lora", "sft-lora/fp8"]), ("qa", ["base", "dpo-lora"]))
            for v in variants]
    plot_scores(rows, tmp_path / "eval_scores.png")
    legends = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in drawn[0].axes]
    assert legends == [["base", "trained", "quantized"], ["base", "trained"]]


def test_peak_memory_a_step_records_counts_its_server():
    """Records carry their own peak memory (tracking.peak_rss_mb): with children=True a larger child,
    as serving_bench's server, sets it. Measured in a fresh process, whose only child is that one."""
    import json
    import subprocess
    import sys

    code = """
import json, subprocess, sys
from snaketune.tracking import peak_rss_mb
subprocess.run([sys.executable, "-c", "b = bytearray(400 * 2**20); b[::4096] = b'x' * len(b[::4096])"], check=True)
print(json.dumps([peak_rss_mb(), peak_rss_mb(children=True)]))
"""
    own, with_child = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                                check=True).stdout.splitlines()[-1])
    assert own < 400 <= with_child < 500, (own, with_child)


# ------------------------------------------------------------------------------------- slow

@pytest.fixture(scope="module")
def report(small_study):
    work = small_study
    out = work / "report.html"
    result = snakemake(work, "--report", str(out), "plots")
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    return work, out


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.mark.slow
def test_figures_are_real_pngs(report):
    work, _ = report
    for name in FIGURES:
        data = (work / "results/report" / name).read_bytes()
        w, h = png_size(data)
        assert w >= 400 and h >= 300 and len(data) > 10_000, (name, w, h, len(data))


@pytest.mark.slow
def test_report_is_self_contained_and_embeds_every_figure(report):
    work, out = report
    html = out.read_text()
    assert len(html) > 100_000
    for name in (*FIGURES, "eval_table.html"):
        data = (work / "results/report" / name).read_bytes()
        assert name in html, f"{name} not referenced"
        assert base64.b64encode(data).decode() in html, f"{name} not embedded as a data URI"
    for caption in ("Training loss per logged step", "Eval scores across variants",
                    "Throughput and memory"):
        assert caption in html, caption
    # no reference to anything outside the file (scripts, styles, images)
    external = re.findall(r"""(?:src|href)=["'](?!data:|#|javascript:)([^"']+)["']""", html)
    assert not [u for u in external if u.startswith(("http", "/", "file:", "results/"))], external[:10]
    assert "train_adapter" in html and "evaluate" in html  # the rule graph / rules
    assert "System Message" not in html  # the captions and the description are valid reStructuredText


@pytest.mark.slow
def test_report_and_terminal_summary_agree_on_every_number(report):
    work, out = report
    summary_md = (work / "results/summary.md").read_text()
    rows = json.loads((work / "results/summary.json").read_text())["rows"]
    table = (work / "results/report/eval_table.html").read_text()
    assert html_cells(table) == md_cells(summary_md)
    numbers = json.loads((work / "results/report/numbers.json").read_text())
    assert [(e["variant"], e["score"], e["n"], e["size_mb"]) for e in numbers["eval"]] == \
        [(r["variant"], r["score"], r["n"], r["size_mb"]) for r in rows]
    # the chart labels use the summary's format: every score cell of summary.md is a bar label
    for cells, entry in zip(md_cells(summary_md)[1:], numbers["eval"]):
        assert cells[4] == f"{entry['score']:.3f}" and cells[5] == str(entry["n"])
    # the loss curves are the training.json log histories
    for run in numbers["training"]:
        model, recipe = run["name"].split("/")
        folder = "adapter" if recipe == "sft-lora" else "model"
        history = json.loads((work / f"results/{model}/{recipe}/{folder}/training.json").read_text())["log_history"]
        assert run["loss"] == [h["loss"] for h in history if "loss" in h]
    assert {r["name"] for r in numbers["training"]} == {f"{MODEL}/pt", f"{MODEL}/sft-lora"}
    assert all(r["max_rss_mb"] and r["tokens_per_s"] for r in numbers["training"])
    # and the report embeds exactly that table
    assert base64.b64encode(table.encode()).decode() in out.read_text()
    # serving columns: the summary's throughput cell is the figure's point at the top concurrency
    head = md_cells(summary_md)[0]
    if "serve tok/s" in head:
        col = head.index("serve tok/s")
        served = {(r["model"], r["variant"]): r["serving"] for r in rows if r.get("serving")}
        assert served and numbers["serving"], "the small study serves sft-lora"
        for cells in md_cells(summary_md)[1:]:
            serving = served.get((cells[0], cells[1]))
            if serving:
                run = next(r for r in numbers["serving"] if r["name"].startswith(f"{cells[0]}/{cells[1]} ("))
                top = run["output_tokens_per_s"][run["concurrency"].index(max(run["concurrency"]))]
                assert cells[col] == f"{top:.0f}" == f"{serving['output_tokens_per_s']:.0f}"
    # which is the table the run printed in the terminal when it ended
    printed = (work / "snakemake.out").read_text()
    assert summary_md.strip() in printed


def chromium() -> str | None:
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def screenshot(url: str, png: Path, profile: Path, size: str = "1280,2000") -> None:
    browser = chromium()
    if not browser:
        if os.environ.get("SNAKETUNE_REQUIRE_CHROMIUM") == "1":
            pytest.fail("chromium is not installed: run ci/chromium.sh")
        pytest.skip("chromium is not installed (ci/chromium.sh installs it)")
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={profile}", "--virtual-time-budget=10000", f"--screenshot={png}",
           f"--window-size={size}", url]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert png.is_file(), f"chromium wrote no screenshot (exit {result.returncode}): {result.stderr[-2000:]}"


def colour_share(png: Path, box: tuple | None = None) -> tuple[float, int]:
    """Share of the most common colour, and the number of distinct colours (in ``box`` if given)."""
    from PIL import Image

    img = Image.open(png).convert("RGB")
    if box:
        img = img.crop(box)
    colours = img.getcolors(maxcolors=img.width * img.height)
    return max(n for n, _ in colours) / (img.width * img.height), len(colours)


@pytest.mark.slow
def test_report_renders_in_headless_chromium(report, tmp_path):
    work, out = report
    png = work / "report-screenshot.png"  # kept beside the study for a look
    screenshot(out.resolve().as_uri(), png, tmp_path / "profile")
    share, distinct = colour_share(png)
    assert share < 0.97 and distinct > 50, f"the page looks empty: {share:.1%} one colour, {distinct} colours"
    # a blank page in the same browser is all one colour: the check can tell the difference
    blank = tmp_path / "blank.html"
    blank.write_text("<html><body></body></html>")
    screenshot(blank.as_uri(), tmp_path / "blank.png", tmp_path / "profile2")
    assert colour_share(tmp_path / "blank.png")[0] > 0.99


# Opening a figure the way a click in the menu does (the report's own app.setView), after load.
SHOW_FIGURE = """<script>window.addEventListener("load", () => setTimeout(() => {
  const path = Object.keys(results).find(p => p.endsWith("/NAME"));
  app.setView({content: "img", contentPath: results[path].data_uri});
}, 300));</script>"""


@pytest.mark.slow
@pytest.mark.parametrize("figure", FIGURES)
def test_each_figure_shows_in_the_report_in_chromium(report, tmp_path, figure):
    work, out = report
    html = out.read_text()
    end = html.rindex("</body>")
    page = tmp_path / "view.html"
    page.write_text(html[:end] + SHOW_FIGURE.replace("NAME", figure) + html[end:])
    png = work / f"report-{figure}"
    screenshot(page.as_uri(), png, tmp_path / "profile", size="1280,900")
    share, distinct = colour_share(png, box=(300, 0, 1280, 900))  # right of the menu
    assert share < 0.99 and distinct > 100, f"{figure} not drawn: {share:.1%} one colour, {distinct} colours"
    # the same page pointing at no figure draws nothing there: the check tells them apart
    page.write_text(html[:end] + SHOW_FIGURE.replace("NAME", "missing.png").replace(
        "results[path].data_uri", "'data:image/png;base64,'") + html[end:])
    screenshot(page.as_uri(), tmp_path / "empty.png", tmp_path / "profile2", size="1280,900")
    assert colour_share(tmp_path / "empty.png", box=(300, 0, 1280, 900))[0] > 0.999


def test_serving_runs_get_a_throughput_panel(tmp_path):
    """Serving benchmarks add output tokens/s by concurrency and their peak memory, named by what
    their JSON says it served (not by where it lies)."""
    from snaketune.report import plot_throughput, serving_runs

    path = tmp_path / "x" / "elsewhere.json"
    path.parent.mkdir()
    path.write_text(json.dumps({
        "model": "m", "variant": "sft", "engine": "transformers", "peak_rss_mb": 1500.5,
        "levels": [{"concurrency": 1, "output_tokens_per_s": 50.0}, {"concurrency": 4, "output_tokens_per_s": 120.5}]}))
    runs = serving_runs([str(path)])
    assert runs == [{"name": "m/sft (transformers)", "engine": "transformers", "concurrency": [1, 4],
                     "output_tokens_per_s": [50.0, 120.5], "max_rss_mb": 1500.5}]
    train = [{"name": "m/sft", "tokens_per_s": 1000.0, "max_rss_mb": 800.0}]
    plot_throughput(train, runs, tmp_path / "t.png")
    assert png_size((tmp_path / "t.png").read_bytes())[0] >= 1400  # three panels


def test_loss_plot_shows_the_held_out_loss_of_eval_steps(tmp_path, monkeypatch):
    """A training.json with eval_loss entries (eval_steps) gives a second, labelled line in its
    panel; a run without them keeps one line and no legend."""
    import json

    from snaketune.report import plot_loss, training_runs

    results = tmp_path / "results"
    history = {"with": [{"step": 2, "loss": 2.0}, {"step": 2, "eval_loss": 2.5}, {"step": 4, "loss": 1.5},
                        {"step": 4, "eval_loss": 2.1}],
               "without": [{"step": 2, "loss": 2.0}, {"step": 4, "loss": 1.5}]}
    dirs = []
    for recipe, log in history.items():
        folder = results / "m" / recipe / "adapter"
        folder.mkdir(parents=True)
        (folder / "training.json").write_text(json.dumps({"model": "m", "variant": recipe, "recipe": recipe, "stage": "sft",
                                                          "train_type": "lora", "log_history": log}))
        dirs.append(str(folder))
    runs = training_runs(dirs)
    assert [(r["name"], r["eval_steps"], r["eval_loss"]) for r in runs] == [("m/with", [2, 4], [2.5, 2.1]),
                                                                             ("m/without", [], [])]
    drawn = []
    monkeypatch.setattr(report_module, "_save", lambda fig, path: drawn.append(fig))
    plot_loss(runs, tmp_path / "loss.png")
    with_, without = drawn[0].axes[:2]
    assert [list(line.get_ydata()) for line in with_.get_lines()] == [[2.0, 1.5], [2.5, 2.1]]
    assert [t.get_text() for t in with_.get_legend().get_texts()] == ["training loss", "held-out loss (eval_steps)"]
    assert len(without.get_lines()) == 1 and without.get_legend() is None
