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


def test_per_step_resources_and_merge_memory_sized_from_the_model(tmp_path):
    """resources.steps.<rule> sets one rule's resources; merge_adapter without a mem_mb gets three
    times its base model's files + 2 GB (a 5 GB base: 18,106 MB), instead of the CPU default."""
    import re

    import yaml

    study = yaml.safe_load((ROOT / "config.yaml").read_text())
    study["resources"] = {"gpu": {"gpu": 0}, "steps": {"merge_adapter": {"runtime": 33}, "summary": {"mem_mb": 777}}}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    base = tmp_path / "results/tiny-qwen2/pt/model"
    base.mkdir(parents=True)
    with open(base / "model.safetensors", "wb") as fh:  # sparse: 5 GB on paper, nothing on disk
        fh.truncate(5 * 1024**3)
    result = _snakemake("-n", "results/tiny-qwen2/sft-lora/model", "results/summary.md", "--configfile",
                        str(tmp_path / "study.yaml"), cwd=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    jobs = dict(re.findall(r"^rule (\w+):\n(?:    .*\n)*?    resources: (.*)$", out, re.M))
    assert "runtime=33" in jobs["merge_adapter"] and "mem_mb=18106," in jobs["merge_adapter"]
    assert "mem_mb=777," in jobs["summary"] and "runtime=60" in jobs["summary"]
    assert "mem_mb=4000," in jobs["prepare_data"]


def test_resources_steps_names_every_rule_with_resources():
    import re

    import yaml

    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    names = set(schema["properties"]["resources"]["properties"]["steps"]["propertyNames"]["enum"])
    rules = set()
    for smk in (ROOT / "workflow/rules").glob("*.smk"):
        rules |= set(re.findall(r'job_resources\("\w+", "(\w+)"', smk.read_text()))
    assert names == rules
