"""A study survives a broken variant (issue 19 item 3): the other variants finish, and the summary
and the report are built over what finished, the broken cell FAILED with its step's error."""

import json

import pytest
import yaml

from conftest import ROOT, snakemake
from snaketune.report import score_table
from snaketune.summary import first_error, markdown

NF4_ERROR = "snaketune: error: bnb-nf4 on CPU: bitsandbytes' CPU kernels need every quantized layer's input width"

# ------------------------------------------------------------------------------------- fast


def test_first_error_prefers_the_steps_own_message(tmp_path):
    log = tmp_path / "step.log"
    log.write_text("loading\n\nsnaketune: error: data.jsonl:3: field 'messages': fix it there\nmore advice\n")
    assert first_error(str(log)) == "snaketune: error: data.jsonl:3: field 'messages': fix it there"


def test_first_error_takes_a_tracebacks_exception_line(tmp_path):
    log = tmp_path / "step.log"
    log.write_text("Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
                   "RuntimeError: shape '[96, 1]' is invalid for input of size 144\n"
                   "[rank0]: exited with code 1\n")
    assert first_error(str(log)) == "RuntimeError: shape '[96, 1]' is invalid for input of size 144"
    log.write_text("")
    assert "log is empty" in first_error(str(log))
    assert first_error(str(tmp_path / "missing.log")).startswith("no log")


def test_failed_cells_are_rows_and_notes_in_the_summary_and_the_report():
    rows = [{"model": "m", "variant": "base", "bench": "b", "metric": "exact_match", "score": 0.5, "n": 4,
             "size_mb": 1.0, "quantization": None}]
    failed = [{"model": "m", "variant": "base/nf4", "bench": "b", "metric": "exact_match", "step": "quantize",
               "log": "results/logs/m/base/nf4/quantize.log", "error": "snaketune: error: widths <64"}]
    md = markdown(rows, failed)
    assert "| m | base/nf4 | b | exact_match | FAILED (quantize) | – | – | – | – | – |" in md
    assert ("- m · base/nf4 · b: quantize: snaketune: error: widths <64 (log: results/logs/m/base/nf4/quantize.log)"
            in md)
    assert markdown(rows) == markdown(rows, [])  # a study without failures: the table as it was
    page = score_table(rows, md, failed)
    assert "<td>FAILED (quantize)</td>" in page and "widths &lt;64" in page and "nf4/quantize.log" in page


# ------------------------------------------------------------------------------------- slow


def broken_study() -> dict:
    """The demo at tiny widths (32: not a multiple of 64), evaluated as base, base/fp8 and base/nf4,
    whose quantize step refuses these widths on CPU."""
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config["models"]["tiny-qwen2"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    config["datasets"]["arith"].update(max_operand=12, n_test=20)
    config["quantize"]["nf4"] = {"method": "bnb-nf4", "dataset": "arith"}
    config["benches"]["arith"]["limit"] = 10
    config["evaluation"]["variants"] = ["base", "base/fp8", "base/nf4"]
    config.pop("serving")
    return config


@pytest.mark.slow
def test_a_broken_variant_is_a_failed_cell_not_a_stopped_study(tmp_path):
    config = broken_study()
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, timeout=900)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out[-5000:]
    res = tmp_path / "results"
    for variant in ("base", "base/fp8"):
        assert (res / f"tiny-qwen2/{variant}/eval/arith.json").is_file(), out[-5000:]
    assert not (res / "tiny-qwen2/base/nf4").exists()  # nothing half-written

    md = (res / "summary.md").read_text()
    assert md in out  # printed at the end, like a finished study's
    scored = {r["variant"]: r["score"] for r in json.loads((res / "summary.json").read_text())["rows"]}
    assert set(scored) == {"base", "base/fp8"}
    for variant, score in scored.items():
        assert f"| tiny-qwen2 | {variant} | arith | exact_match | {score:.3f} |" in md
    assert "| tiny-qwen2 | base/nf4 | arith | exact_match | FAILED (quantize) |" in md
    log = "results/logs/tiny-qwen2/base/nf4/quantize.log"
    assert f"- tiny-qwen2 · base/nf4 · arith: quantize: {NF4_ERROR}" in md and f"(log: {log})" in md

    numbers = json.loads((res / "report/numbers.json").read_text())
    assert [e["variant"] for e in numbers["eval"]] == ["base", "base/fp8"]
    assert [(f["variant"], f["step"], f["log"]) for f in numbers["failed"]] == [("base/nf4", "quantize", log)]
    assert "FAILED (quantize)" in (res / "report/eval_table.html").read_text()

    # Without the broken variant the next run rebuilds the summary (marked incomplete), nothing else.
    config["evaluation"]["variants"] = ["base", "base/fp8"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, timeout=900)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-5000:]
    assert "FAILED" not in (res / "summary.md").read_text()
    assert json.loads((res / "summary.json").read_text())["failed"] == []
    assert "rule evaluate:" not in out and "rule quantize:" not in out
