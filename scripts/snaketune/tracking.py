"""MLflow tracking for one workflow step: one step invocation is one MLflow run.

The workflow says where to log through the ``SNAKETUNE_TRACKING`` environment variable, a JSON
object ``{"uri": ..., "experiment": ..., "tags": {...}}``, and names the job in ``SNAKETUNE_JOB``
(``rule[wildcards]``). Without them, steps log to ``$MLFLOW_TRACKING_URI`` or to the embedded
default ``sqlite:///results/mlflow.db``.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import logging
import os
import time
from pathlib import Path

DEFAULT_URI = "sqlite:///results/mlflow.db"
_MAX_PARAM = 6000


def resolve_uri(uri: str | None) -> str:
    """Pick the tracking URI: explicit setting, then ``MLFLOW_TRACKING_URI``, then embedded."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # make relative sqlite paths absolute so every job opens the same file
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


def _context() -> dict:
    raw = os.environ.get("SNAKETUNE_TRACKING")
    return json.loads(raw) if raw else {}


def flatten(d: dict, prefix: str = "") -> dict:
    """Flatten nested dicts to dotted keys, stringifying values for MLflow params."""
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:_MAX_PARAM]
    return out


class StepRun:
    """Thin handle over an active MLflow run."""

    def __init__(self, mlflow, run):
        self._mlflow = mlflow
        self.run = run
        self.run_id = run.info.run_id

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        if clean:
            self._mlflow.log_metrics(clean, step=step)

    def log_params(self, params: dict) -> None:
        self._mlflow.log_params(flatten(params))

    def set_tags(self, tags: dict) -> None:
        self._mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if Path(path).exists():
            self._mlflow.log_artifact(str(path), artifact_path)


class NullRun:
    """Stands in for a run where nothing is logged (non-zero ranks of a multi-process job)."""

    run_id = None

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        pass

    def log_params(self, params: dict) -> None:
        pass

    def set_tags(self, tags: dict) -> None:
        pass

    def log_artifact(self, path, artifact_path=None) -> None:
        pass


class MemoryRun(NullRun):
    """Keeps every logged metric series in ``metrics`` (name -> list): for tests and benchmarks
    that call a step in-process and read what it logged."""

    def __init__(self):
        self.metrics: dict[str, list] = collections.defaultdict(list)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        for k, v in metrics.items():
            self.metrics[k].append(v)


@contextlib.contextmanager
def _store_lock(uri: str):
    """Serialise first contact with an SQLite store: concurrent jobs would race on its schema."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _setup(mlflow, uri: str, experiment: str) -> None:
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        location = None
        if uri.startswith("sqlite:///"):
            location = Path(uri[len("sqlite:///"):]).parent.joinpath("mlartifacts").as_uri()
        try:
            mlflow.create_experiment(experiment, artifact_location=location)
        except Exception:  # another process created it first (a tracking server is not locked)
            if mlflow.get_experiment_by_name(experiment) is None:
                raise
    mlflow.set_experiment(experiment)


@contextlib.contextmanager
def step_run(step: str, params: dict, run_name: str | None = None):
    """Open an MLflow run for ``step`` with its resolved ``params``; yield a StepRun.

    The run ends FAILED if the block raises, FINISHED otherwise. Duration is logged. In a
    multi-process job (torchrun) only rank 0 logs; other ranks get a NullRun.
    """
    if int(os.environ.get("RANK", "0")) != 0:
        yield NullRun()
        return
    for name in ("alembic", "mlflow", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import mlflow

    ctx = _context()
    uri = resolve_uri(ctx.get("uri"))
    experiment = ctx.get("experiment") or "snaketune"
    tags = {"snaketune.step": step, **ctx.get("tags", {})}
    job = os.environ.get("SNAKETUNE_JOB")
    if job:
        rule, _, wildcards = job.partition("[")
        tags.update({"snakemake.job": job, "snakemake.rule": rule, "snakemake.wildcards": wildcards.rstrip("]")})
    if os.environ.get("SLURM_JOB_ID"):
        tags["slurm.job_id"] = os.environ["SLURM_JOB_ID"]
    with _store_lock(uri):
        _setup(mlflow, uri, experiment)
    start = time.time()
    with mlflow.start_run(run_name=run_name or tags.get("snaketune.job") or step) as run:
        handle = StepRun(mlflow, run)
        handle.set_tags(tags)
        handle.log_params(params)
        yield handle
        handle.log_metrics({"duration_s": time.time() - start})
