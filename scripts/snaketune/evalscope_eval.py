"""Step `evalscope_eval`: score one model folder on one benchmark with EvalScope; write the eval JSON.

EvalScope 1.14 runs in its own venv (``ci/evalscope.sh`` builds ``.venv-evalscope``): it depends
on ``modelscope[datasets]``, which caps ``datasets`` at 4.8.4 while the training venv pins 5.2.0.
This module runs in the training venv, prepares the data, starts a server when asked, and runs
EvalScope as a child process of that venv's python (``python -m snaketune.evalscope_eval
--run-task SPEC``, which imports only EvalScope and the standard library).

``params.via``:

- ``local`` (default): EvalScope loads the checkpoint itself (``eval_type="llm_ckpt"``, transformers).
- ``server``: the model is served (``params.serve``, exactly as for ``snaketune.serve``: engine
  ``transformers`` or ``vllm``) on 127.0.0.1 with a free port, EvalScope calls it as an
  OpenAI-compatible endpoint (``eval_type="openai_api"``), and the server is stopped afterwards.
  ``params.api_url`` instead evaluates an endpoint that is already running (``params.api_key_env``
  names the variable holding its key).

Benchmarks:

- default: the workflow's own split: ``DATA/<split>.jsonl`` chat rows become EvalScope
  ``general_qa`` rows (``messages`` = every turn but the last, ``answer`` = the last assistant turn).
- ``params.general_qa``: a local folder of ``general_qa`` JSONL files (``query``/``response`` or
  ``messages``/``answer``), one subset per file (``params.subsets``, default every ``*.jsonl``).
- ``params.benchmark``: one of EvalScope's named benchmarks (``gsm8k``, ``mmlu``, ``ceval`` …) with
  ``params.dataset_args`` (e.g. ``{"local_path": "/data/gsm8k"}``) and ``params.dataset_hub``; the
  data must be local or the hub reachable.

Everything is offline (``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE``) unless ``params.online``.
Prompts are English: the user turn is sent as is (``prompt_template: "{question}"``); decoding is
greedy. Metrics: ``exact_match`` / ``contains`` (computed here from EvalScope's predictions, as in
``snaketune.evaluate``) plus EvalScope's own offline metrics (ROUGE for ``general_qa``; BLEU needs
NLTK data that is not shipped, so it is off unless ``params.metric_list`` asks for it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from snaketune.errors import SnaketuneError, cli
from snaketune.evaluate import METRICS
from snaketune.files import jsonl_rows, model_hash, read_jsonl, record_names
from snaketune.schema import resolve

DEFAULT_PYTHON = ".venv-evalscope/bin/python"
OUR_METRICS = tuple(METRICS)  # scored here on EvalScope's predictions, as the evaluate step scores
SCRIPTS = str(Path(__file__).resolve().parents[1])


def evalscope_python(params: dict) -> str:
    """The interpreter that has EvalScope: params.python, $SNAKETUNE_EVALSCOPE_PYTHON, or the venv."""
    for candidate in (params.get("python"), os.environ.get("SNAKETUNE_EVALSCOPE_PYTHON")):
        if candidate:
            if os.sep in candidate and not Path(candidate).exists():
                raise SnaketuneError(f"EvalScope python {candidate} does not exist: build the venv with "
                                     "`bash ci/evalscope.sh` or fix the `python` setting")
            return candidate
    for base in (Path.cwd(), Path(SCRIPTS).parent):
        if (base / DEFAULT_PYTHON).exists():
            return str(base / DEFAULT_PYTHON)
    raise SnaketuneError(
        "EvalScope's venv was not found: build it with `bash ci/evalscope.sh` (creates .venv-evalscope), "
        "or set evaluation params `python` / $SNAKETUNE_EVALSCOPE_PYTHON to a python that has evalscope==1.14.0"
    )


def split_to_general_qa(data_dir: Path, split: str, limit: int | None, out_dir: Path) -> str:
    """Write ``<split>.jsonl`` chat rows as EvalScope general_qa rows; returns the subset name."""
    src = data_dir / f"{split}.jsonl"
    if not src.is_file():
        raise SnaketuneError(f"benchmark split {src} does not exist: set the bench's split to one the "
                             "dataset step writes (train or test)")
    out_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(out_dir / f"{split}.jsonl", "w", encoding="utf-8") as out:
        for lineno, row in jsonl_rows(src):
            msgs = row.get("messages")
            if not msgs or msgs[-1].get("role") != "assistant":
                raise SnaketuneError(f"{src}:{lineno}: expected chat rows ending in an assistant turn")
            out.write(json.dumps({"messages": msgs[:-1], "answer": msgs[-1]["content"]}, ensure_ascii=False) + "\n")
            n += 1
            if limit and n >= limit:
                break
    if not n:
        raise SnaketuneError(f"{src} has no rows")
    return split


def build_spec(model_dir: str, data_dir: str | None, params: dict, work: Path) -> dict:
    """The TaskConfig fields for EvalScope (JSON-serialisable)."""
    gen = {"max_tokens": int(params["max_new_tokens"]), "temperature": 0.0}
    spec: dict = {
        "work_dir": str(work / "evalscope"),
        "no_timestamp": True,
        "eval_batch_size": int(params.get("eval_batch_size", 1)),
        "seed": 0,
        "generation_config": gen,
    }
    if params.get("limit") and params.get("benchmark"):
        spec["limit"] = int(params["limit"])
    if params.get("benchmark"):
        name = params["benchmark"]
        dargs = dict(params.get("dataset_args", {}))
        spec.update(datasets=[name], dataset_args={name: dargs})
        if params.get("dataset_hub"):
            spec["dataset_hub"] = params["dataset_hub"]
        if params.get("dataset_dir"):
            spec["dataset_dir"] = params["dataset_dir"]
        return spec
    if params.get("general_qa"):
        folder = Path(params["general_qa"]).expanduser().resolve()
        if folder.is_file():
            folder, subsets = folder.parent, [folder.stem]
        else:
            subsets = sorted(p.stem for p in folder.glob("*.jsonl"))
        if not subsets:
            raise SnaketuneError(f"general_qa folder {folder} has no *.jsonl files")
        if params.get("limit"):
            spec["limit"] = int(params["limit"])
    else:
        if not data_dir:
            raise SnaketuneError("evalscope_eval needs --data (a dataset folder) or params.general_qa / benchmark")
        folder = work / "general_qa"
        subsets = [split_to_general_qa(Path(data_dir), params["split"], params.get("limit"), folder)]
    spec.update(
        datasets=["general_qa"],
        dataset_args={"general_qa": {
            "local_path": str(folder),
            "subset_list": subsets,
            "prompt_template": params.get("prompt_template", "{question}"),
            "metric_list": params.get("metric_list", ["Rouge"]),
        }},
    )
    return spec


def read_results(work_dir: Path) -> tuple[list[dict], dict]:
    """Per-sample (prompt, reference, prediction) from EvalScope's reviews, and its report metrics."""
    samples = []
    for path in sorted(work_dir.glob("reviews/*/*.jsonl")):
        for r in read_jsonl(path):
            score = r["sample_score"]["score"]
            target = r.get("target")
            reference = target[0] if isinstance(target, list) and target else target
            prompt = next((m["content"] for m in reversed(r.get("messages", [])) if m.get("role") == "user"), None)
            samples.append({"subset": path.stem, "index": r.get("index"), "prompt": prompt,
                            "reference": reference, "prediction": score.get("prediction"),
                            "scores": score.get("value", {})})
    metrics = {}
    for path in sorted(work_dir.glob("reports/*/*.json")):
        rep = json.loads(path.read_text())
        for m in rep.get("metrics", []):
            ident = m.get("identity", {})
            dims = ident.get("dimensions") or {}
            key = ".".join([ident.get("name", "metric")] + [f"{k}={v}" for k, v in sorted(dims.items())])
            metrics[f"{rep.get('dataset_name')}/{key}"] = m.get("score")
        prim = rep.get("primary_metric_identity")
        if prim:
            dims = prim.get("dimensions") or {}
            pkey = ".".join([prim.get("name", "metric")] + [f"{k}={v}" for k, v in sorted(dims.items())])
            metrics.setdefault("_primary", f"{rep.get('dataset_name')}/{pkey}")
    return samples, metrics


def run_evalscope(spec: dict, python: str, params: dict, log) -> None:
    """Run EvalScope on ``spec`` in ``python`` (a child process); raise with its log tail on failure."""
    spec_path = Path(spec["work_dir"]).parent / "task.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    env = {**os.environ, "PYTHONPATH": SCRIPTS + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if not params.get("online"):
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run([python, "-m", "snaketune.evalscope_eval", "--run-task", str(spec_path)],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=3600)
    log.write(proc.stdout)
    log.flush()
    if proc.returncode != 0:
        raise SnaketuneError(f"EvalScope failed (exit {proc.returncode}) with {python}; its output ends:\n"
                             f"{proc.stdout[-4000:]}")


def evaluate(model_dir: str, data_dir: str | None, params: dict, log=sys.stderr) -> dict:
    """Run the benchmark (a benches block) on ``model_dir`` (locally or served); returns the eval record."""
    params = resolve("benches", params)
    metric = params["metric"]
    if metric not in (*OUR_METRICS, "evalscope"):
        raise SnaketuneError(f"unknown metric {metric!r}: use {', '.join(OUR_METRICS)} or evalscope")
    via = params.get("via", "local")
    if via not in ("local", "server"):
        raise SnaketuneError(f"evaluation via {via!r}: use local or server")
    python = evalscope_python(params)
    t0 = time.time()
    work = Path(tempfile.mkdtemp(prefix="snaketune-evalscope-"))
    server = None
    try:
        spec = build_spec(model_dir, data_dir, params, work)
        if via == "local":
            spec.update(model=str(Path(model_dir).resolve()), eval_type="llm_ckpt",
                        model_args={"device_map": params.get("device", "cpu"), "precision": "auto"})
            run_evalscope(spec, python, params, log)
        else:
            from snaketune.serve import ServerProcess, api_key, terminate_as_exit

            serve_params = dict(params.get("serve", {}))
            with terminate_as_exit():
                if params.get("api_url"):
                    url, name = params["api_url"], params.get("served_model_name", Path(model_dir).name)
                    key = api_key({"api_key_env": params["api_key_env"]}) if params.get("api_key_env") else None
                    spec.update(model=name, eval_type="openai_api", api_url=url, api_key=key or "EMPTY")
                    run_evalscope(spec, python, params, log)
                else:
                    server = ServerProcess(model_dir, serve_params)
                    try:
                        server.start()
                        server.wait_ready()
                        spec.update(model=server.model_name, eval_type="openai_api", api_url=server.base_url,
                                    api_key=server.api_key or "EMPTY")
                        run_evalscope(spec, python, params, log)
                    finally:
                        server.stop()
                        log.write(server.log_tail(8000))
                        server.cleanup_log()
        samples, ev_metrics = read_results(Path(spec["work_dir"]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not samples:
        raise SnaketuneError("EvalScope produced no scored samples: check the benchmark data and the log")
    metrics = {name: sum(bool(METRICS[name](s["prediction"] or "", str(s["reference"]))) for s in samples) / len(samples)
               for name in OUR_METRICS}
    primary = ev_metrics.pop("_primary", None)
    score = metrics[metric] if metric in OUR_METRICS else ev_metrics.get(primary)
    per_sample = METRICS.get(metric)  # None for EvalScope's metric: its per-sample values are in "scores"
    for s in samples:
        s["correct"] = bool(METRICS["exact_match"](s["prediction"] or "", str(s["reference"])))
        s["score"] = float(per_sample(s["prediction"] or "", str(s["reference"]))) if per_sample else None
    version = subprocess.run([python, "-c", "import evalscope; print(evalscope.__version__)"],
                             capture_output=True, text=True).stdout.strip()
    record = {
        "bench": params.get("name"),
        "metric": metric if metric in OUR_METRICS else primary,
        "score": score,
        "n": len(samples),
        "engine": "evalscope",
        "via": via,
        "serve_engine": (params.get("serve", {}).get("engine", "transformers") if via == "server" else None),
        "evalscope_version": version,
        "metrics": {**metrics, **{f"evalscope:{k}": v for k, v in ev_metrics.items()}},
        "model_path": str(model_dir),
        "model_sha256": model_hash(model_dir),
        "seconds": round(time.time() - t0, 2),
        "examples": [{"subset": s["subset"], "prompt": s["prompt"], "reference": s["reference"],
                      "prediction": s["prediction"], "correct": s["correct"]} for s in samples[:10]],
        "predictions": [{k: s[k] for k in ("subset", "index", "prompt", "reference", "prediction", "score", "scores")}
                        for s in samples],
    }
    return record


def run_task_child(spec_path: str) -> None:
    """Inside EvalScope's venv: run one TaskConfig from JSON (imports only EvalScope)."""
    from evalscope import TaskConfig, run_task

    spec = json.loads(Path(spec_path).read_text())
    run_task(TaskConfig(**spec))


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m snaketune.evalscope_eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF model folder to evaluate")
    ap.add_argument("--data", help="dataset folder holding the benchmark split (workflow benches)")
    ap.add_argument("--params", default="{}", help="JSON: the bench block (+ via, serve, benchmark, ...)")
    ap.add_argument("--out", help="eval JSON to write")
    ap.add_argument("--predictions", help="every sample as JSON lines (default: <out>.predictions.jsonl)")
    ap.add_argument("--model-name", help="the config's model name, recorded as model (the workflow passes it)")
    ap.add_argument("--variant", help="the variant evaluated (base, a recipe, <stem>/<quantize name>), recorded")
    ap.add_argument("--run-task", help=argparse.SUPPRESS)  # internal: runs inside EvalScope's venv
    args = ap.parse_args(argv)
    if args.run_task:
        run_task_child(args.run_task)
        return
    if not (args.model and args.out):
        ap.error("--model and --out are required")
    if not (Path(args.model) / "config.json").is_file():
        raise SnaketuneError(f"--model {args.model} is not an HF model folder (no config.json)")
    params = json.loads(args.params)
    from snaketune.evaluate import write_results
    from snaketune.tracking import step_run

    with step_run("evalscope_eval", params) as run:
        record = {**record_names(args.model_name, args.variant), **evaluate(args.model, args.data, params)}
        write_results(record, args.out, args.predictions)
        run.log_metrics({k: v for k, v in record["metrics"].items() if isinstance(v, (int, float))
                         and ":" not in k} | {"n": record["n"], "eval_seconds": record["seconds"]})
        run.log_artifact(args.out)
    print(f"{record['bench']} on {args.variant or args.model} ({record['via']}): {record['metric']} = "
          f"{record['score']} ({record['n']} samples) -> {args.out}")


if __name__ == "__main__":
    main()
