"""The evaluate step's files: the eval JSON with its first samples, and every sample beside it."""

import json


def test_every_prediction_is_kept_beside_the_eval_json(tiny_model, tiny_data, tmp_path):
    """The eval JSON keeps 10 examples; <bench>.predictions.jsonl has each of the 20 samples with
    its prompt, reference, prediction and score, and the scores average to the eval score."""
    from snaketune.evaluate import main

    out = tmp_path / "eval" / "arith.json"
    main(["--model", str(tiny_model), "--data", str(tiny_data), "--out", str(out), "--variant", "base",
          "--model-name", "tiny", "--params", json.dumps({"name": "arith", "metric": "contains", "max_new_tokens": 4})])
    record = json.loads(out.read_text())
    assert {k: record[k] for k in ("model", "variant", "recipe", "quantize", "bench")} == {
        "model": "tiny", "variant": "base", "recipe": None, "quantize": None, "bench": "arith"}
    rows = [json.loads(line) for line in (tmp_path / "eval" / "arith.predictions.jsonl").read_text().splitlines()]
    assert "predictions" not in record and len(record["examples"]) == 10 and record["n"] == len(rows) == 20
    test = [json.loads(line)["messages"] for line in (tiny_data / "test.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(20))
    assert [(r["prompt"], r["reference"]) for r in rows] == [(m[-2]["content"], m[-1]["content"]) for m in test]
    assert all(r["score"] == float(r["reference"].strip() in r["prediction"]) for r in rows)
    assert sum(r["score"] for r in rows) / len(rows) == record["score"]
    assert [r["prediction"] for r in rows[:10]] == [e["prediction"] for e in record["examples"]]


def test_summary_report_and_bundle_read_the_records_names_not_their_paths(tmp_path):
    """An eval JSON and a training.json stored where their path says nothing (or something else) are
    named by their own model, variant, bench and recipe fields (a variant with a quantize name too)."""
    from snaketune.bundle import collect_metrics
    from snaketune.files import record_names
    from snaketune.report import training_runs
    from snaketune.summary import row_for

    model_dir = tmp_path / "somewhere"
    model_dir.mkdir()
    record = {**record_names("m", "sft/q8"), "bench": "b", "metric": "exact_match", "score": 0.5, "n": 4,
              "model_path": str(model_dir)}
    assert record["recipe"] == "sft" and record["quantize"] == "q8"
    (tmp_path / "elsewhere.json").write_text(json.dumps(record))
    row = row_for(str(tmp_path / "elsewhere.json"))
    assert (row["model"], row["variant"], row["bench"]) == ("m", "sft/q8", "b")

    results = tmp_path / "results"
    (results / "x" / "y" / "eval").mkdir(parents=True)  # a layout that would name it x/y
    (results / "x" / "y" / "eval" / "z.json").write_text(json.dumps(record))
    (results / "x" / "y" / "adapter").mkdir()
    training = {**record_names("m", "sft"), "steps": 3, "train_loss": 1.0, "log_history": [{"step": 3, "loss": 1.0}]}
    (results / "x" / "y" / "adapter" / "training.json").write_text(json.dumps(training))
    assert collect_metrics(results) == {"eval/m/sft/q8/b.exact_match": 0.5, "eval/m/sft/q8/b.n": 4,
                                        "train/m/sft.train_loss": 1.0, "train/m/sft.steps": 3,
                                        "train/m/sft.loss_history": [[3, 1.0]]}
    assert [r["name"] for r in training_runs([str(results / "x" / "y" / "adapter")])] == ["m/sft"]


def test_running_out_of_gpu_memory_names_the_bench_key(tiny_model, tiny_data, tmp_path, monkeypatch, capsys):
    """A generation that runs out of GPU memory ends as advice naming the bench's batch_size, and
    no eval JSON is written."""
    import pytest
    import torch

    import snaketune.evaluate as step

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(step, "generate", out_of_memory)
    out = tmp_path / "eval" / "arith.json"
    with pytest.raises(SystemExit) as stop:
        step.main(["--model", str(tiny_model), "--data", str(tiny_data), "--out", str(out), "--variant", "base",
                   "--model-name", "tiny", "--params", json.dumps({"name": "arith", "metric": "contains",
                                                                    "batch_size": 16, "max_new_tokens": 4})])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    assert "out of GPU memory generating answers for 20 prompts, 16 at a time" in err
    assert "set benches.arith.batch_size: 8 in the config" in err and not out.exists()
