"""The evaluate step's files: the eval JSON with its first samples, and every sample beside it."""

import json


def test_every_prediction_is_kept_beside_the_eval_json(tiny_model, tiny_data, tmp_path):
    """The eval JSON keeps 10 examples; <bench>.predictions.jsonl has each of the 20 samples with
    its prompt, reference, prediction and score, and the scores average to the eval score."""
    from snaketune.evaluate import main

    out = tmp_path / "eval" / "arith.json"
    main(["--model", str(tiny_model), "--data", str(tiny_data), "--out", str(out), "--variant", "base",
          "--params", json.dumps({"name": "arith", "metric": "contains", "max_new_tokens": 4})])
    record = json.loads(out.read_text())
    rows = [json.loads(line) for line in (tmp_path / "eval" / "arith.predictions.jsonl").read_text().splitlines()]
    assert "predictions" not in record and len(record["examples"]) == 10 and record["n"] == len(rows) == 20
    test = [json.loads(line)["messages"] for line in (tiny_data / "test.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(20))
    assert [(r["prompt"], r["reference"]) for r in rows] == [(m[-2]["content"], m[-1]["content"]) for m in test]
    assert all(r["score"] == float(r["reference"].strip() in r["prediction"]) for r in rows)
    assert sum(r["score"] for r in rows) / len(rows) == record["score"]
    assert [r["prediction"] for r in rows[:10]] == [e["prediction"] for e in record["examples"]]
