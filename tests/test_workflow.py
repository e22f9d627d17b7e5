"""The whole default workflow (config.yaml as it is), run by Snakemake in a temporary directory."""

import json
import re

import pytest
import yaml

from conftest import copy_study, record_learning, snakemake

pytestmark = pytest.mark.slow
MODEL = "tiny-qwen2"


def jobs_run(result):
    """Rule names of the jobs a snakemake run executed, with multiplicity."""
    return sorted(re.findall(r"Finished jobid: \d+ \(Rule: (\w+)\)", result.stdout + result.stderr))


def score(work, variant):
    return json.loads((work / f"results/{MODEL}/{variant}/eval/arith.json").read_text())["score"]


def test_every_step_leaves_its_artifact(default_study):
    work, _ = default_study
    res = work / "results" / MODEL
    assert (res / "base/model/config.json").is_file() and (res / "base/model/source.json").is_file()
    assert (res / "pt/model/model.safetensors").is_file()
    assert (res / "sft-lora/adapter/adapter_config.json").is_file()
    assert json.loads((res / "sft-lora/model/merge.json").read_text())["max_logit_diff"] < 1e-3
    assert (res / "sft-lora/fp8/model/quantization.json").is_file()
    assert len((res / "sft-lora/fp8/eval/arith.predictions.jsonl").read_text().splitlines()) == 200
    for name in ("train", "test", "pretrain", "preference", "kto"):
        assert (work / f"results/datasets/arith/{name}.jsonl").is_file()
    assert not list(work.glob("results/**/.*partial*")), "temporary output left behind"


def test_adapter_loads_in_plain_peft_and_matches_the_merged_model(default_study):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    work, _ = default_study
    res = work / "results" / MODEL
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(res / "pt/model"), res / "sft-lora/adapter")
    merged = AutoModelForCausalLM.from_pretrained(res / "sft-lora/model")
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        assert torch.allclose(adapted(ids).logits, merged(ids).logits, atol=1e-4)


@pytest.mark.learning
def test_sft_learns_what_base_cannot(default_study):
    work, _ = default_study
    base, pt, sft = score(work, "base"), score(work, "pt"), score(work, "sft-lora")
    record_learning("demo sft-lora held-out exact match", sft, 0.5)
    assert base <= 0.02 and pt <= 0.05, (base, pt)
    assert sft >= 0.5, sft
    record = json.loads((work / f"results/{MODEL}/sft-lora/eval/arith.json").read_text())
    # self-describing: the rules pass model, variant and bench to the step, which records them
    assert {k: record[k] for k in ("model", "variant", "recipe", "quantize", "bench")} == {
        "model": MODEL, "variant": "sft-lora", "recipe": "sft-lora", "quantize": None, "bench": "arith"}
    training = json.loads((work / f"results/{MODEL}/sft-lora/adapter/training.json").read_text())
    quantized = json.loads((work / f"results/{MODEL}/sft-lora/fp8/model/quantization.json").read_text())
    assert (training["model"], training["recipe"]) == (MODEL, "sft-lora")
    assert (quantized["model"], quantized["variant"], quantized["quantize"]) == (MODEL, "sft-lora/fp8", "fp8")
    serving = json.loads((work / f"results/{MODEL}/sft-lora/fp8/serving/transformers.json").read_text())
    assert (serving["model"], serving["variant"], serving["quantize"]) == (MODEL, "sft-lora/fp8", "fp8")
    assert training["peak_rss_mb"] > 0 and serving["peak_rss_mb"] > 0
    summary = json.loads((work / "results/summary.json").read_text())
    served = {(r["variant"], r["serving"]["serving_json"]) for r in summary["rows"] if r["serving"]}
    assert served == {(v, f"results/{MODEL}/{v}/serving/transformers.json") for v in ("sft-lora", "sft-lora/fp8")}
    assert record["n"] == 200 and record["metric"] == "exact_match" and len(record["model_sha256"]) == 64
    assert record["model_path"].endswith("sft-lora/model")


def test_summary_joins_every_variant_and_is_printed(default_study):
    work, result = default_study
    rows = json.loads((work / "results/summary.json").read_text())["rows"]
    assert {r["variant"] for r in rows} == {"base", "pt", "sft-lora", "sft-lora/fp8"}
    assert {r["variant"]: r["score"] for r in rows}["sft-lora"] == score(work, "sft-lora")
    assert "| tiny-qwen2 | sft-lora | arith | exact_match |" in result.stdout


def test_one_mlflow_run_per_job_with_params_metrics_and_tags(default_study):
    import mlflow

    work, result = default_study
    mlflow.set_tracking_uri(f"sqlite:///{work}/results/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["demo"], output_format="list")
    rules = sorted(r.data.tags["snakemake.rule"] for r in runs)
    assert rules == [j for j in jobs_run(result) if j != "all"]
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags["git.commit"]
        assert "duration_s" in run.data.metrics
    names = [r.info.run_name for r in runs]
    assert len(set(names)) == len(names), names
    assert {"train pt", "train sft-lora", "quantize sft-lora/fp8", "evaluate sft-lora/fp8 · arith"} <= set(names)
    train = next(r for r in runs if r.data.tags["snakemake.rule"] == "train_adapter")
    assert train.data.params["learning_rate"] == "0.002" and train.data.params["lora.r"] == "16"
    assert train.data.tags["snakemake.wildcards"] == f"model={MODEL},recipe=sft-lora"
    history = mlflow.MlflowClient().get_metric_history(train.info.run_id, "loss")
    assert len(history) >= 5 and history[-1].value < history[0].value


def test_second_run_does_nothing(default_study):
    work, _ = default_study
    result = snakemake(work)
    assert result.returncode == 0 and "Nothing to be done" in result.stdout + result.stderr


def test_changing_one_recipe_reruns_only_its_dependants(default_study, tmp_path):
    work = copy_study(default_study[0], tmp_path / "study")
    config = yaml.safe_load((work / "config.yaml").read_text())
    config["recipes"]["sft-lora"]["max_steps"] = 100
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    untouched = work / f"results/{MODEL}/pt/eval/arith.json"
    before = untouched.stat().st_mtime_ns
    adapter = work / f"results/{MODEL}/sft-lora/adapter/adapter_model.safetensors"
    old_adapter = adapter.read_bytes()
    result = snakemake(work)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert jobs_run(result) == ["all", "evaluate", "evaluate", "merge_adapter", "plots", "quantize",
                                "serving_bench", "serving_bench", "summary", "train_adapter"]
    assert untouched.stat().st_mtime_ns == before
    # trained anew for 100 steps, not resumed from the 600-step run's checkpoints
    training = json.loads((work / f"results/{MODEL}/sft-lora/adapter/training.json").read_text())
    assert training["steps"] == 100 and training["resumed_from"] is None, training["resumed_from"]
    assert adapter.read_bytes() != old_adapter


def test_an_artifact_gone_after_a_failed_forced_rerun_is_rebuilt(default_study, tmp_path):
    """A failed `--forcerun merge_adapter` deletes the merged model; the eval JSON made from it is
    still there. The plain command must rebuild the model (it is a target of `all`), not say
    'Nothing to be done'."""
    import shutil

    work = copy_study(default_study[0], tmp_path / "study")
    shutil.rmtree(work / f"results/{MODEL}/sft-lora/model")
    result = snakemake(work, "-n")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "Nothing to be done" not in out and "merge_adapter" in out
