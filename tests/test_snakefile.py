"""The Snakefile itself: lint-clean, light to parse, and the example cluster study plans."""

import subprocess
import sys

from conftest import ROOT


def _snakemake(*args, cwd):
    return subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "workflow/Snakefile"), *args],
                          capture_output=True, text=True, timeout=300, cwd=cwd)


def test_lint_is_clean(tmp_path):
    result = _snakemake("--lint", "--configfile", str(ROOT / "config.yaml"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Congratulations, your workflow is in a good condition!" in result.stdout + result.stderr


def test_example_cluster_study_plans_with_real_sizes(tmp_path):
    result = _snakemake("-n", "--configfile", str(ROOT / "configs/qwen2.5-7b-alpaca.yaml"), cwd=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "train_adapter" in out and "quantize" in out
    assert "gpu_model=h100" in out and "runtime=240" in out and "mem_mb=64000" in out
    assert "prepare_data" in out and "alpaca-zh" in out and "alpaca-en" in out


def test_parsing_imports_no_ml_framework(tmp_path):
    code = ("import sys, runpy; sys.argv = ['snakemake', '-n', '-q', '--snakefile', %r, '--configfile', %r];"
            "\ntry: runpy.run_module('snakemake', run_name='__main__')\nexcept SystemExit: pass"
            "\nprint('HEAVY', sorted(m for m in ('torch', 'transformers', 'peft', 'trl') if m in sys.modules))"
            % (str(ROOT / "workflow/Snakefile"), str(ROOT / "config.yaml")))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert "HEAVY []" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]
