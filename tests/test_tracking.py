"""MLflow tracking: runs land in the embedded SQLite store and on a real tracking server."""

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from snaketune.tracking import resolve_uri, step_run


def _runs(uri, experiment):
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


def test_step_run_logs_params_metrics_tags_and_artifacts(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/m.db"
    monkeypatch.setenv("SNAKETUNE_TRACKING", json.dumps(
        {"uri": uri, "experiment": "exp", "tags": {"snakemake.rule": "train_adapter", "git.commit": "abc"}}))
    note = tmp_path / "note.json"
    note.write_text("{}")
    with step_run("train", {"lora": {"r": 8}, "learning_rate": 1e-4}) as run:
        run.log_metrics({"loss": 2.0}, step=1)
        run.log_metrics({"loss": 1.0}, step=2)
        run.log_artifact(note)
    [r] = _runs(uri, "exp")
    assert r.data.params == {"lora.r": "8", "learning_rate": "0.0001"}
    assert r.data.tags["snakemake.rule"] == "train_adapter" and r.data.tags["snaketune.step"] == "train"
    assert r.data.metrics["loss"] == 1.0 and "duration_s" in r.data.metrics
    assert r.info.status == "FINISHED"
    import mlflow

    history = mlflow.MlflowClient(uri).get_metric_history(r.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.0)]
    assert [a.path for a in mlflow.MlflowClient(uri).list_artifacts(r.info.run_id)] == ["note.json"]


def test_failed_step_ends_its_run_failed_with_the_error(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/m.db"
    monkeypatch.setenv("SNAKETUNE_TRACKING", json.dumps({"uri": uri, "experiment": "exp"}))
    with pytest.raises(RuntimeError):
        with step_run("evaluate", {}):
            raise RuntimeError("shape '[96, 1]' is invalid for input of size 144\n  more detail")
    [r] = _runs(uri, "exp")
    assert r.info.status == "FAILED"
    assert r.data.tags["error"] == "RuntimeError: shape '[96, 1]' is invalid for input of size 144"


# (step, SNAKETUNE_JOB as the workflow sets it) -> run name
JOBS = {
    ("data", "prepare_data[dataset=arith]"): "data arith",
    ("model", "fetch_model[model=tiny-qwen2]"): "model tiny-qwen2",
    ("train", "train_full[model=tiny-qwen2,recipe=pt]"): "train pt",
    ("train", "train_adapter[model=tiny-qwen2,recipe=sft-lora]"): "train sft-lora",
    ("align", "train_adapter[model=tiny-qwen2,recipe=dpo-lora]"): "align dpo-lora",
    ("merge", "merge_adapter[model=tiny-qwen2,recipe=sft-lora]"): "merge sft-lora",
    ("quantize", "quantize[model=tiny-qwen2,stem=sft-lora,quant=fp8]"): "quantize sft-lora/fp8",
    ("evaluate", "evaluate[model=tiny-qwen2,variant=sft-lora,bench=arith]"): "evaluate sft-lora · arith",
    ("evaluate", "evaluate[model=tiny-qwen2,variant=sft-lora/fp8,bench=arith]"): "evaluate sft-lora/fp8 · arith",
    ("evalscope_eval", "evaluate[model=tiny-qwen2,variant=sft-lora/fp8,bench=gsm8k]"): "evaluate sft-lora/fp8 · gsm8k",
    ("serving_bench", "serving_bench[model=tiny-qwen2,variant=sft-lora,engine=vllm]"): "serve sft-lora · vllm",
    ("summary", "summary[]"): "summary",
}


@pytest.mark.parametrize("models", [1, 2])
def test_runs_are_named_after_their_job(models, tmp_path, monkeypatch):
    """Each job's run has its own name: the verb, the variant path and the bench; with several
    models in the study the model leads the path (``train tiny-qwen2/sft-lora``)."""
    uri = f"sqlite:///{tmp_path}/m.db"
    monkeypatch.setenv("SNAKETUNE_TRACKING", json.dumps({"uri": uri, "experiment": "exp", "models": models}))
    for step, job in JOBS:
        monkeypatch.setenv("SNAKETUNE_JOB", job)
        with step_run(step, {}):
            pass
    import mlflow

    mlflow.set_tracking_uri(uri)
    names = mlflow.search_runs(experiment_names=["exp"])["tags.mlflow.runName"].tolist()
    expected = [name if models == 1 or name.split()[0] in ("data", "model", "summary")
                else name.replace(" ", " tiny-qwen2/", 1) for name in JOBS.values()]
    assert sorted(names) == sorted(expected) and len(set(names)) == len(names)
    if models == 2:
        assert "evaluate tiny-qwen2/sft-lora/fp8 · arith" in names


def test_relative_sqlite_uri_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_uri("") == f"sqlite:///{tmp_path}/results/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_uri("") == "http://127.0.0.1:5999"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_runs_arrive_on_a_real_mlflow_server(tmp_path, monkeypatch):
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not become healthy in 60 s")
        monkeypatch.setenv("SNAKETUNE_TRACKING", json.dumps({"uri": url, "experiment": "remote"}))
        with step_run("evaluate", {"bench": "arith"}) as run:
            run.log_metrics({"exact_match": 0.5})
        [r] = _runs(url, "remote")
        assert r.data.metrics["exact_match"] == 0.5 and r.data.params["bench"] == "arith"
    finally:
        import os
        import signal

        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_concurrent_first_runs_share_a_fresh_sqlite_store(tmp_path):
    """Several steps starting at once on a new store (what Snakemake does) all log their run."""
    uri = f"sqlite:///{tmp_path}/results/mlflow.db"
    code = ("import json, os; from snaketune.tracking import step_run\n"
            "with step_run('data', {'i': os.environ['I']}) as run: run.log_metrics({'x': 1})")
    env = {**__import__("os").environ, "SNAKETUNE_TRACKING": json.dumps({"uri": uri, "experiment": "race"})}
    procs = [subprocess.Popen([sys.executable, "-c", code], env={**env, "I": str(i)}, stderr=subprocess.PIPE)
             for i in range(4)]
    errors = [p.communicate(timeout=300)[1].decode()[-1500:] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    assert sorted(r.data.params["i"] for r in _runs(uri, "race")) == ["0", "1", "2", "3"]


def _lock_store(db):
    """Another writer holding the SQLite store's lock (until ``.rollback()``)."""
    import sqlite3

    lock = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    lock.execute("BEGIN EXCLUSIVE")
    return lock


def test_a_locked_store_neither_stops_nor_slows_the_step(tmp_path, monkeypatch):
    """Another writer holds the store's lock for 8 s: the step's own code is not held up, and its
    run arrives complete (FINISHED, every metric) once the lock is released."""
    import threading

    uri = f"sqlite:///{tmp_path}/m.db"
    monkeypatch.setenv("SNAKETUNE_TRACKING", json.dumps({"uri": uri, "experiment": "exp"}))
    with step_run("data", {}):
        pass  # the store exists
    lock = _lock_store(tmp_path / "m.db")
    threading.Timer(8, lock.rollback).start()
    t0 = time.time()
    with step_run("train", {"learning_rate": 1e-4}) as run:
        for i in range(3):
            run.log_metrics({"loss": float(i)}, step=i)
        inside = time.time() - t0
    assert inside < 2, inside
    [r] = [r for r in _runs(uri, "exp") if r.data.tags["snaketune.step"] == "train"]
    assert r.info.status == "FINISHED" and r.data.params == {"learning_rate": "0.0001"}
    import mlflow

    assert [m.value for m in mlflow.MlflowClient(uri).get_metric_history(r.info.run_id, "loss")] == [0.0, 1.0, 2.0]


def test_a_store_locked_past_the_step_keeps_its_calls_in_a_file(tmp_path, monkeypatch, capfd):
    uri = f"sqlite:///{tmp_path}/m.db"
    monkeypatch.setenv("SNAKETUNE_TRACKING", json.dumps({"uri": uri, "experiment": "exp"}))
    monkeypatch.setenv("SNAKETUNE_TRACKING_WAIT", "3")
    with step_run("data", {}):
        pass
    lock = _lock_store(tmp_path / "m.db")
    try:
        with step_run("train", {"learning_rate": 1e-4}) as run:
            run.log_metrics({"loss": 1.5}, step=7)
    finally:
        lock.rollback()
    err = capfd.readouterr().err
    assert "logging calls of this step are not in the store" in err and "outputs are complete" in err
    [pending] = list((tmp_path / "mlflow-pending").glob("train-*.json"))
    calls = json.loads(pending.read_text())["calls"]
    assert {"kind": "metrics", "args": [{"loss": 1.5}, 7, calls[1]["args"][2]]} in calls or \
        any(c["kind"] == "metrics" and c["args"][0] == {"loss": 1.5} for c in calls)


def test_a_step_with_a_resume_file_is_one_run_across_restarts(tmp_path, monkeypatch):
    """step_run(resume=FILE): a stop with a checkpoint (exit 75) ends the run KILLED, a failure
    FAILED; the next invocation reopens that run (error tag gone, restarts counted) and a finished
    run forgets the file, so the invocation after it is a new run. A file of another store is not
    reopened."""
    import mlflow

    uri = f"sqlite:///{tmp_path}/m.db"
    monkeypatch.setenv("SNAKETUNE_TRACKING", json.dumps({"uri": uri, "experiment": "exp"}))
    resume = tmp_path / "ckpt" / "mlflow_run.json"
    with pytest.raises(SystemExit):
        with step_run("train", {"lr": 1}, resume) as run:
            run.log_metrics({"loss": 3.0}, step=1)
            raise SystemExit(75)
    [first] = _runs(uri, "exp")
    assert first.info.status == "KILLED" and "stopped" in first.data.tags
    assert json.loads(resume.read_text())["run_id"] == first.info.run_id
    with pytest.raises(RuntimeError):
        with step_run("train", {"lr": 1}, resume) as run:
            run.log_metrics({"loss": 2.0}, step=2)
            raise RuntimeError("out of memory")
    [again] = _runs(uri, "exp")
    assert again.info.run_id == first.info.run_id and again.info.status == "FAILED"
    assert again.data.tags["error"] == "RuntimeError: out of memory" and again.data.tags["snaketune.resumes"] == "1"
    with step_run("train", {"lr": 1}, resume) as run:
        run.log_metrics({"loss": 1.0}, step=3)
    [done] = _runs(uri, "exp")
    assert done.info.run_id == first.info.run_id and done.info.status == "FINISHED"
    assert "error" not in done.data.tags and done.data.tags["snaketune.resumes"] == "2"
    history = mlflow.MlflowClient(uri).get_metric_history(done.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 3.0), (2, 2.0), (3, 1.0)]
    assert not resume.exists()
    with step_run("train", {"lr": 1}, resume):
        pass
    assert len(_runs(uri, "exp")) == 2  # a finished training's next invocation is a new run
    resume.write_text(json.dumps({"uri": "sqlite:////elsewhere.db", "experiment": "exp", "run_id": first.info.run_id}))
    with step_run("train", {"lr": 1}, resume):
        pass
    assert len(_runs(uri, "exp")) == 3
