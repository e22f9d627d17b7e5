"""Step `evaluate`: score one model folder on one benchmark and write the eval JSON.

Engine ``transformers``: greedy generation in-process with the tokenizer's chat template, on the
dataset folder's ``test.jsonl`` (the last assistant turn is the reference); rows with images go to
a vision-language model with their images (snaketune.vision). Metrics:
``exact_match`` (stripped strings equal) and ``contains`` (reference appears in the output).
The eval JSON keeps the first 10 samples (``examples``); every sample (prompt, reference,
prediction, score) goes to the predictions file, ``<bench>.predictions.jsonl`` beside it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from snaketune.atomic import atomic_file, write_json
from snaketune.errors import SnaketuneError, cli
from snaketune import vision
from snaketune.files import jsonl_rows, model_hash, record_names
from snaketune.model import check_weights
from snaketune.schema import resolve

METRICS = {
    "exact_match": lambda pred, ref: pred.strip() == ref.strip(),
    "contains": lambda pred, ref: ref.strip() in pred,
}


def load_cases(data_dir: Path, split: str, limit: int | None) -> list[tuple[list[dict], str, list[str]]]:
    """(prompt messages, reference answer, image paths) of the rows of ``<split>.jsonl``."""
    path = data_dir / f"{split}.jsonl"
    if not path.is_file():
        raise SnaketuneError(f"benchmark split {path} does not exist: set benches.<name>.split "
                             "to a split the dataset step writes (train or test)")
    cases = []
    for _, row in jsonl_rows(path):
        msgs = row["messages"]
        cases.append((msgs[:-1], msgs[-1]["content"], [str(data_dir / p) for p in row.get("images", [])]))
    if not cases:
        raise SnaketuneError(f"benchmark split {path} has no rows: give the bench's dataset chat rows in that "
                             "split (test_size or test_path for test), or set benches.<name>.split")
    return cases[:limit] if limit else cases


def generate(model_dir: str | Path, prompts: list[list[dict]], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy completions for chat prompts, batched with left padding."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(1)
    check_weights(model_dir, "evaluate")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto", device_map="cuda" if cuda else None)
    model.eval()
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    outputs = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True,
                        add_special_tokens=False).to(model.device)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        outputs += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return outputs


def evaluate(model_dir: str, data_dir: str, params: dict) -> dict:
    """Run the benchmark described by ``params`` (a benches block) on ``model_dir``; returns the eval record."""
    import torch

    params = resolve("benches", params)
    metric = params["metric"]
    if metric not in METRICS:
        raise SnaketuneError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")
    cases = load_cases(Path(data_dir), params["split"], params.get("limit"))
    t0 = time.time()
    try:
        if any(c[2] for c in cases):
            check_weights(model_dir, "evaluate")
            vision.check_model(model_dir, [Path(data_dir) / f"{params['split']}.jsonl"])
            preds = vision.generate(model_dir, [c[0] for c in cases], [c[2] for c in cases],
                                    params["max_new_tokens"], params["batch_size"])
        else:
            preds = generate(model_dir, [c[0] for c in cases], params["max_new_tokens"], params["batch_size"])
    except torch.OutOfMemoryError as err:
        key, batch = f"benches.{params.get('name') or '<name>'}", params["batch_size"]
        fix = (f"set {key}.batch_size: {batch // 2} in the config" if batch > 1 else
               f"lower {key}.max_new_tokens, or evaluate on a GPU with more memory")
        raise SnaketuneError(f"out of GPU memory generating answers for {len(cases)} prompts, {batch} at a time, "
                             f"up to {params['max_new_tokens']} new tokens each: {fix}") from err
    hits = [METRICS[metric](p, c[1]) for p, c in zip(preds, cases)]
    return {
        "bench": params.get("name"),
        "metric": metric,
        "score": sum(hits) / len(hits),
        "n": len(hits),
        "engine": "transformers",
        "model_path": str(model_dir),
        "model_sha256": model_hash(model_dir),
        "seconds": round(time.time() - t0, 2),
        "examples": [{"prompt": vision.text_of(c[0][-1]["content"]), "reference": c[1], "prediction": p, "correct": h,
                      **({"images": c[2]} if c[2] else {})} for c, p, h in list(zip(cases, preds, hits))[:10]],
        "predictions": [{"index": i, "prompt": vision.text_of(c[0][-1]["content"]), "reference": c[1],
                         "prediction": p, "score": float(h), **({"images": c[2]} if c[2] else {})}
                        for i, (c, p, h) in enumerate(zip(cases, preds, hits))],
    }


def predictions_path(out: str | Path) -> Path:
    """Where every sample of the eval JSON ``out`` goes: ``<bench>.predictions.jsonl`` beside it."""
    return Path(out).with_suffix(".predictions.jsonl")


def write_results(record: dict, out: str | Path, predictions: str | Path | None = None) -> None:
    """Write the record's samples (``predictions``) as JSON lines and the rest as the eval JSON, each atomically."""
    with atomic_file(predictions or predictions_path(out)) as fh:
        for sample in record["predictions"]:
            fh.write(json.dumps(sample, ensure_ascii=False) + "\n")
    write_json(out, {k: v for k, v in record.items() if k != "predictions"})


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m snaketune.evaluate", description=__doc__)
    ap.add_argument("--model", required=True, help="HF model folder to evaluate")
    ap.add_argument("--data", required=True, help="dataset folder holding the benchmark split")
    ap.add_argument("--params", required=True, help="JSON: the evaluation.benches.<name> block")
    ap.add_argument("--out", required=True, help="eval JSON to write")
    ap.add_argument("--predictions", help="every sample as JSON lines (default: <out>.predictions.jsonl)")
    ap.add_argument("--model-name", help="the config's model name, recorded as model (the workflow passes it)")
    ap.add_argument("--variant", help="the variant evaluated (base, a recipe, <stem>/<quantize name>), recorded")
    args = ap.parse_args(argv)
    params = json.loads(args.params)
    from snaketune.tracking import step_run

    with step_run("evaluate", params) as run:
        record = {**record_names(args.model_name, args.variant), **evaluate(args.model, args.data, params)}
        write_results(record, args.out, args.predictions)
        run.log_metrics({record["metric"]: record["score"], "n": record["n"], "eval_seconds": record["seconds"]})
        run.log_artifact(args.out)
    print(f"{record['bench']} on {args.variant or args.model}: {record['metric']} = {record['score']:.3f} "
          f"({record['n']} samples) -> {args.out}")


if __name__ == "__main__":
    main()
