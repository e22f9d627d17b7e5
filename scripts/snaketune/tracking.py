"""MLflow tracking for one workflow step: one step invocation is one MLflow run.

The workflow says where to log through the ``SNAKETUNE_TRACKING`` environment variable, a JSON
object ``{"uri": ..., "experiment": ..., "tags": {...}, "models": N}``, and names the job in
``SNAKETUNE_JOB`` (``rule[wildcards]``), from which the run is named (``train sft-lora``,
``evaluate sft-lora/fp8 · arith``; the model leads the path when the study has several). Without
them, steps log to ``$MLFLOW_TRACKING_URI`` or to the embedded default ``sqlite:///results/mlflow.db``,
in a run named after the step. A failed step's run ends FAILED with the error's first line as tag
``error``; a training keeps its run id in its checkpoint folder and a resumed training continues
that run (``step_run(resume=...)``).
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
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


VERBS = {"evalscope_eval": "evaluate", "serving_bench": "serve"}  # step -> the verb of its run name
SUFFIXES = ("bench", "engine")  # wildcards named after the path, behind " · "


def run_name(step: str, job: str | None, several_models: bool = False) -> str:
    """The MLflow run name of ``step`` run as Snakemake job ``job`` (``rule[k=v,...]``): the verb, the
    variant path and the bench or engine, e.g. ``evaluate sft-lora/fp8 · arith``."""
    labels = (job or "").partition("[")[2].rstrip("]")
    wildcards = dict(part.split("=", 1) for part in labels.split(",") if "=" in part)
    suffix = [wildcards.pop(k) for k in SUFFIXES if k in wildcards]
    if "model" in wildcards and not several_models and len(wildcards) > 1:
        del wildcards["model"]
    name = " ".join(filter(None, [VERBS.get(step, step), "/".join(wildcards.values())]))
    return " · ".join([name, *suffix])


def peak_rss_mb(children: bool = False) -> float:
    """This process's peak resident memory in MB (with ``children``: or its largest waited-for child's,
    a server it ran, if larger), as the step's own record of what it needed. Linux's VmHWM, which
    starts afresh at exec: getrusage's own maxrss keeps the peak of the process it was forked from."""
    import resource

    own = None
    try:
        with open("/proc/self/status") as fh:
            own = next((int(line.split()[1]) for line in fh if line.startswith("VmHWM:")), None)
    except OSError:
        pass
    if own is None:
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = max(own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) if children else own
    return round(peak / 1024, 1)


def error_line(exc: BaseException) -> str:
    """What a failed run records: the exception's type and the first line of its message."""
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0].strip()[:500]}" if lines else type(exc).__name__


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
    """Handle of one step's MLflow run. Every call is queued and done by a background thread
    (``_Tracker``), so a slow, locked or unreachable store never holds up or fails the step."""

    def __init__(self, tracker: "_Tracker"):
        self._tracker = tracker

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        if clean:
            self._tracker.submit("metrics", clean, step or 0, int(time.time() * 1000))

    def log_params(self, params: dict) -> None:
        self._tracker.submit("params", flatten(params))

    def set_tags(self, tags: dict) -> None:
        self._tracker.submit("tags", {k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Log a small file as it is now (a copy is queued, so later changes of it do not count)."""
        if Path(path).is_file():
            copy = Path(tempfile.mkdtemp(prefix="snaketune-artifact-")) / Path(path).name
            shutil.copy2(path, copy)
            self._tracker.submit("artifact", str(copy), artifact_path)


class _Tracker:
    """Does the MLflow calls of one run in order in a background thread and retries a failed one
    (backing off to 10 s) until it succeeds. ``close`` waits for the queue to drain for at most
    ``SNAKETUNE_TRACKING_WAIT`` seconds (default 120); what is still undone then is written to
    ``mlflow-pending/`` beside the store with a warning, and the step ends as it would have."""

    def __init__(self, uri: str, experiment: str, run_name: str, tags: dict, resume: Path | None = None):
        import queue
        import threading

        self.uri, self.experiment, self.run_name, self.tags = uri, experiment, run_name, tags
        self.resume = resume
        self.run_id: str | None = None
        self.client = None
        self.queue: queue.Queue = queue.Queue()
        self.current = None
        self.abandoned = False
        self.error: str | None = None
        self.thread = threading.Thread(target=self._loop, name="mlflow", daemon=True)
        self.thread.start()

    def submit(self, kind: str, *args) -> None:
        self.queue.put((kind, args))

    def _do(self, kind: str, args: tuple) -> None:
        import mlflow
        from mlflow.entities import Metric, Param, RunTag

        if self.client is None:
            with _store_lock(self.uri):  # first contact creates or migrates the schema: one process at a time
                _setup(mlflow, self.uri, self.experiment)
                self.client = mlflow.MlflowClient(self.uri)
        client = self.client
        if self.run_id is None:
            self.run_id = self._reopen(client)
            if self.run_id is None:
                exp = client.get_experiment_by_name(self.experiment)
                self.run_id = client.create_run(exp.experiment_id, tags=self.tags, run_name=self.run_name).info.run_id
                if self.resume:
                    from snaketune.atomic import write_json

                    write_json(self.resume, {"uri": self.uri, "experiment": self.experiment, "run_id": self.run_id,
                                             "run_name": self.run_name})
        if kind == "metrics":
            metrics, step, ts = args
            client.log_batch(self.run_id, metrics=[Metric(k, v, ts, step) for k, v in metrics.items()])
        elif kind == "params":
            client.log_batch(self.run_id, params=[Param(k, v) for k, v in args[0].items()])
        elif kind == "tags":
            client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in args[0].items()])
        elif kind == "artifact":
            client.log_artifact(self.run_id, args[0], args[1])
            shutil.rmtree(Path(args[0]).parent, ignore_errors=True)
        elif kind == "end":
            client.set_terminated(self.run_id, args[0])
        elif kind == "forget":  # the step finished: a later invocation is a new run
            self.resume.unlink(missing_ok=True)

    def _reopen(self, client) -> str | None:
        """The run an earlier, interrupted invocation of this step left in ``resume`` (same store
        and experiment, still there), set RUNNING again with its error tag removed and
        ``snaketune.resumes`` counted up; None when there is none."""
        if not self.resume or not self.resume.is_file():
            return None
        try:
            saved = json.loads(self.resume.read_text())
        except ValueError:
            return None
        if (saved.get("uri"), saved.get("experiment")) != (self.uri, self.experiment):
            return None
        from mlflow.exceptions import MlflowException

        try:
            run = client.get_run(saved["run_id"])
        except MlflowException:
            return None
        if run.info.lifecycle_stage != "active":
            return None
        client.update_run(run.info.run_id, status="RUNNING")
        if "error" in run.data.tags:
            client.delete_tag(run.info.run_id, "error")
        resumes = int(run.data.tags.get("snaketune.resumes", "0")) + 1
        client.set_tag(run.info.run_id, "snaketune.resumes", str(resumes))
        return run.info.run_id

    def _loop(self) -> None:
        import sys

        while True:
            item = self.queue.get()
            if item is None or self.abandoned:
                return
            self.current, delay = item, 0.5
            while not self.abandoned:
                try:
                    self._do(*item)
                    break
                except Exception as exc:  # a locked or unreachable store: try again later
                    if self.error is None:
                        print(f"warning: MLflow ({self.uri}) did not take a logging call ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200]}); retrying in the background, the step goes on",
                              file=sys.stderr, flush=True)
                    self.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                    time.sleep(delay)
                    delay = min(delay * 2, 10.0)
            self.current = None

    def close(self, status: str) -> None:
        import sys

        self.submit("end", status)
        if status == "FINISHED" and self.resume:
            self.submit("forget")
        self.queue.put(None)
        self.thread.join(float(os.environ.get("SNAKETUNE_TRACKING_WAIT", "120")))
        if not self.thread.is_alive():
            return
        self.abandoned = True
        left = [self.current] if self.current else []
        while not self.queue.empty():
            item = self.queue.get()
            if item is not None:
                left.append(item)
        folder = (Path(self.uri[len("sqlite:///"):]).parent if self.uri.startswith("sqlite:///") else Path.cwd())
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.run_name)
        path = folder / "mlflow-pending" / f"{safe}-{os.getpid()}-{int(time.time())}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"uri": self.uri, "experiment": self.experiment, "run_name": self.run_name,
                                    "tags": self.tags, "run_id": self.run_id, "error": self.error,
                                    "calls": [{"kind": k, "args": list(a)} for k, a in left]}, indent=1) + "\n")
        print(f"warning: MLflow ({self.uri}) still fails ({self.error}): {len(left)} logging calls of this step are "
              f"not in the store; they are kept in {path}. The step's outputs are complete.", file=sys.stderr,
              flush=True)


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


EXIT_RESUMABLE = 75  # a step that exits with this code stopped to be resumed (train's EXIT_REQUEUE)


@contextlib.contextmanager
def step_run(step: str, params: dict, resume: str | os.PathLike | None = None):
    """Open an MLflow run for ``step`` with its resolved ``params``; yield a StepRun.

    The run ends FAILED, tagged ``error`` with the error's first line, if the block raises, KILLED
    (tag ``stopped``) if it exits with code 75 (a checkpoint saved on SIGTERM/SIGUSR1), FINISHED
    otherwise. Duration is logged. In a multi-process job (torchrun) only rank 0 logs; other ranks
    get a NullRun.

    ``resume`` (a file in the step's checkpoint folder) makes one run of a step across restarts:
    the run's id is kept there, a later invocation that finds it reopens that run (RUNNING again,
    its ``error`` tag removed, tag ``snaketune.resumes`` counting the restarts) instead of starting
    a new one, and a FINISHED run removes it. Metrics of steps repeated after a resume (those after
    the last checkpoint) are logged again at the same step.
    """
    if int(os.environ.get("RANK", "0")) != 0:
        yield NullRun()
        return
    for name in ("alembic", "mlflow", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
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
    tracker = _Tracker(uri, experiment, run_name(step, job, ctx.get("models", 1) > 1), tags,
                       Path(resume) if resume else None)
    handle = StepRun(tracker)
    handle.log_params(params)
    start, status = time.time(), "FAILED"
    try:
        yield handle
        handle.log_metrics({"duration_s": time.time() - start})
        status = "FINISHED"
    except SystemExit as exc:
        if exc.code == EXIT_RESUMABLE:
            status = "KILLED"
            handle.set_tags({"stopped": "stopped with a checkpoint (preemption or time limit); a rerun resumes "
                                        "it in this run" if resume else "stopped with a checkpoint"})
        elif exc.code not in (0, None):
            handle.set_tags({"error": f"exit code {exc.code}"})
        else:
            status = "FINISHED"
        raise
    except BaseException as exc:
        handle.set_tags({"error": error_line(exc)})
        raise
    finally:
        tracker.close(status)
