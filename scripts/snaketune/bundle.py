"""Step `bundle` and the `verify` command: paper-reproduction bundles of a finished study.

``python -m snaketune.bundle pack ...`` (run by the ``bundle`` rule) packs a finished study into
``results/bundles/<study>.tar.gz``::

    <study>/README.md                how to reproduce (for the reader of the bundle)
    <study>/config.yaml              the resolved config (schema defaults filled in)
    <study>/reproduce.json           the metrics to reproduce, tolerances, device
    <study>/code/source.tar.gz       the workflow code at its git commit (git archive)
    <study>/code/dirty.diff          `git diff HEAD` when the tree was dirty (+ code/untracked/)
    <study>/code/git.json            commit, branch, remote, dirty flag
    <study>/env/lock.json            Python, exact package versions, torch build, CUDA, GPU, driver
    <study>/env/requirements.lock    the package versions as pip pins
    <study>/hashes/inputs.json       sha256 of every input file: base model weights + tokenizer, datasets
    <study>/inputs/datasets/<name>/  the local dataset files the study read (reproduce.include_local_data)
    <study>/hashes/artifacts.json    sha256 of every artifact under results/ (weights included)
    <study>/results/...              eval JSON, summary, training.json, manifests, benchmarks, logs,
                                     plots; weights only with --include-weights
    <study>/mlflow/runs.json         every MLflow run of the study: params, tags, metric histories
    <study>/report.html              the Snakemake report
    <study>/MANIFEST.json            sha256 of every file above (the bundle's own hashes)

``python -m snaketune.bundle verify BUNDLE [--run-bundle-code] [--targets ...] [--workdir DIR]`` checks
the archive's members before extracting any, the bundle's own hashes (a changed, missing or added
file fails with its name) and that the numbers it shows are those of reproduce.json; with
``--run-bundle-code`` (or ``--code current``) it re-runs the study (or the named
targets) from the bundled config and code with Snakemake in a fresh directory, compares every
metric with the bundled value within the tolerances of the config's ``reproduce`` block and prints
``metric | bundled | new | delta | tol | result``; it exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from snaketune.atomic import atomic_file
from snaketune.errors import SnaketuneError, cli
from snaketune.data import local_files
from snaketune.files import RECORDS, hash_tree, sha256_file

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
SKIP_DIRS = {"bundles", "cache", "mlartifacts", "checkpoints"}
SKIP_FILES = {"mlflow.db", "mlflow.db-journal", "mlflow.db-wal", "mlflow.db-shm"}
OWN_FILES = {"logs/bundle.log", "benchmarks/bundle.tsv"}  # the bundle job's own, still being written
CODE_DIRS = ("workflow", "scripts", "envs", "configs", "profiles", "ci")
TRAINING_METRICS = ("train_loss", "first_loss", "final_loss", "steps")
EXIT_FAILED = 1
EXIT_NEEDS_CONSENT = 3


def _skipped(rel: Path) -> bool:
    return (any(p in SKIP_DIRS or p.startswith(".") for p in rel.parts[:-1]) or rel.name in SKIP_FILES
            or rel.name.startswith("."))


def result_files(results: Path) -> list[Path]:
    """Every artifact under ``results`` (relative paths): no bundles, caches, checkpoints, MLflow store."""
    return [f.relative_to(results) for f in sorted(results.rglob("*"))
            if f.is_file() and not _skipped(f.relative_to(results)) and str(f.relative_to(results)) not in OWN_FILES]


def is_weight(path: Path) -> bool:
    return path.suffix in WEIGHT_SUFFIXES


# ---------------------------------------------------------------------------------------- metrics

def metric_files(results: Path) -> tuple[list[Path], list[Path]]:
    """The files a study's reproducible numbers come from: its eval JSONs and the ``training.json``
    of every trained adapter or model folder (those of extra targets outside the evaluation grid too)."""
    evals = [path for path in sorted(results.glob("*/**/eval/*.json"))
             if not _skipped(path.relative_to(results))
             and path.relative_to(results).parts[0] not in ("datasets", "benchmarks", "logs", "bundles", "report")]
    trained = [path for path in sorted(results.glob("*/*/*/training.json"))
               if path.relative_to(results).parts[2] in ("adapter", "model")]
    return evals, trained


def rerun_targets(results: Path) -> list[str]:
    """What a whole-study re-run must build to rebuild every number of the bundle: the default target
    and each artifact a number comes from (a study may have trained one as an extra target)."""
    evals, trained = metric_files(results)
    return ["all", *(f"results/{p.relative_to(results).as_posix()}" for p in evals),
            *(f"results/{p.parent.relative_to(results).as_posix()}" for p in trained)]


def collect_metrics(results: Path) -> dict[str, object]:
    """Every reproducible number of a study, by name.

    ``eval/<model>/<variant>/<bench>.<metric>`` (score) and ``....n``; per training run
    ``train/<model>/<recipe>.<train_loss|first_loss|final_loss|steps>`` and ``....loss_history``
    (the logged loss per step). Durations and throughput are not reproducible and not compared.
    """
    metrics: dict[str, object] = {}
    evals, trained = metric_files(results)
    for path in evals:
        rec = json.loads(path.read_text())
        name = f"eval/{rec['model']}/{rec['variant']}/{rec['bench']}"
        metrics[f"{name}.{rec['metric']}"] = rec["score"]
        metrics[f"{name}.n"] = rec["n"]
    for path in trained:
        rec = json.loads(path.read_text())
        name = f"train/{rec['model']}/{rec['recipe']}"
        for key in TRAINING_METRICS:
            if rec.get(key) is not None:
                metrics[f"{name}.{key}"] = rec[key]
        history = [[h["step"], h["loss"]] for h in rec.get("log_history", []) if "loss" in h]
        if history:
            metrics[f"{name}.loss_history"] = history
    return metrics


def tolerance_for(key: str, table: dict) -> float:
    """Absolute tolerance of a metric: its full name, else its short name, else ``default``, else 0."""
    short = key.rsplit(".", 1)[-1]
    for name in (key, short, "default"):
        if name in table:
            return float(table[name])
    return 0.0


def compare(bundled: dict, new: dict, tolerances: dict, only_new: bool) -> list[dict]:
    """One row per metric: bundled, new, delta, tolerance, pass/fail."""
    rows = []
    for key in sorted(set(bundled) | set(new)):
        old, cur = bundled.get(key), new.get(key)
        tol = tolerance_for(key, tolerances)
        if cur is None and only_new:
            continue
        if old is None or cur is None:
            rows.append({"metric": key, "bundled": old, "new": cur, "delta": None, "tol": tol, "ok": False,
                         "why": "missing in the new run" if cur is None else "not in the bundle"})
            continue
        if isinstance(old, list):  # loss history: [[step, loss], ...]
            steps_match = [s for s, _ in old] == [s for s, _ in cur]
            delta = max((abs(a[1] - b[1]) for a, b in zip(old, cur)), default=0.0) if steps_match else float("inf")
            ok = steps_match and delta <= tol
            rows.append({"metric": key, "bundled": f"{len(old)} steps", "new": f"{len(cur)} steps",
                         "delta": delta, "tol": tol, "ok": ok, "why": "" if steps_match else "logged steps differ"})
            continue
        delta = cur - old
        rows.append({"metric": key, "bundled": old, "new": cur, "delta": delta, "tol": tol,
                     "ok": abs(delta) <= tol, "why": ""})
    return rows


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def table(rows: list[dict]) -> str:
    head = ["metric", "bundled", "new", "delta", "tol", "result"]
    body = [[r["metric"], _fmt(r["bundled"]), _fmt(r["new"]), _fmt(r["delta"]), _fmt(r["tol"]),
             ("pass" if r["ok"] else "FAIL") + (f" ({r['why']})" if r.get("why") else "")] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


# ------------------------------------------------------------------------------------ environment

CPU_KERNEL_VARS = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else the platform's word for it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """Python, exact package versions, torch build, CPU model and kernel settings, CUDA/cuDNN, GPU
    model and driver."""
    from importlib import metadata

    packages = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            packages[name.lower()] = dist.version
    env = {
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        # CPU runs are bitwise reproducible per CPU model: another model's kernels round differently
        "cpu": {"model": cpu_model(), **{k: os.environ[k] for k in CPU_KERNEL_VARS if os.environ.get(k)}},
        "packages": dict(sorted(packages.items())),
        "torch": None,
        "gpus": [],
        "driver": None,
    }
    try:
        import torch

        env["torch"] = {
            "version": torch.__version__,
            "cuda": torch.version.cuda,
            "hip": getattr(torch.version, "hip", None),
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "cuda_available": torch.cuda.is_available(),
            "num_threads": torch.get_num_threads(),
        }
        env["cpu"]["capability"] = torch.backends.cpu.get_cpu_capability()
        if torch.cuda.is_available():
            env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            lines = [[c.strip() for c in ln.split(",")] for ln in out.stdout.strip().splitlines()]
            env["gpus"] = [f"{ln[0]} ({ln[2]})" if len(ln) > 2 else ln[0] for ln in lines]
            env["driver"] = lines[0][1] if len(lines[0]) > 1 else None
    except (OSError, subprocess.TimeoutExpired):
        pass
    return env


def uses_gpu(env: dict) -> bool:
    return bool((env.get("torch") or {}).get("cuda_available"))


# ------------------------------------------------------------------------------------------- code

def _git(repo: Path, *args: str, binary: bool = False):
    out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, timeout=120)
    if out.returncode != 0:
        raise SnaketuneError(f"git {' '.join(args)} failed in {repo}: {out.stderr.decode(errors='replace').strip()}")
    return out.stdout if binary else out.stdout.decode()


def pack_code(repo: Path, dest: Path) -> dict:
    """The workflow code at its commit (git archive), the diff of a dirty tree, untracked code files."""
    try:
        root = Path(_git(repo, "rev-parse", "--show-toplevel").strip())
    except SnaketuneError:
        raise SnaketuneError(f"{repo} is not in a git checkout: a bundle records the workflow code by its "
                             "git commit; run the study from a clone of the snaketune repository") from None
    commit = _git(root, "rev-parse", "HEAD").strip()
    dest.mkdir(parents=True)
    (dest / "source.tar.gz").write_bytes(_git(root, "archive", "--format=tar.gz", f"--prefix=snaketune-{commit[:12]}/",
                                              commit, binary=True))
    diff = _git(root, "diff", "HEAD", "--binary", binary=True)
    untracked = [p for p in _git(root, "ls-files", "--others", "--exclude-standard", "-z").split("\0") if p]
    kept, left = [], []
    for rel in untracked:
        f = root / rel
        if rel.split("/")[0] in CODE_DIRS and f.is_file() and f.stat().st_size < 1 << 20:
            target = dest / "untracked" / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)
            kept.append(rel)
        else:
            left.append(rel)
    if diff:
        (dest / "dirty.diff").write_bytes(diff)
    info = {"commit": commit, "dirty": bool(diff or kept),
            "branch": _git(root, "rev-parse", "--abbrev-ref", "HEAD").strip(),
            "remote": subprocess.run(["git", "-C", str(root), "remote", "get-url", "origin"], capture_output=True,
                                     text=True).stdout.strip() or None,
            "untracked_included": kept, "untracked_left_out": left}
    (dest / "git.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def unpack_code(code: Path, dest: Path) -> Path:
    """Rebuild the bundled workflow tree (commit + diff + untracked files) under ``dest``."""
    with tarfile.open(code / "source.tar.gz") as tar:
        tar.extractall(dest, filter="data")
    root = next(p for p in dest.iterdir() if p.is_dir())
    if (code / "dirty.diff").is_file() and (code / "dirty.diff").stat().st_size:
        out = subprocess.run(["git", "apply", "--whitespace=nowarn", str((code / "dirty.diff").resolve())],
                             cwd=root, capture_output=True, text=True)
        if out.returncode != 0:
            raise SnaketuneError(f"the bundled diff does not apply to the bundled commit: {out.stderr.strip()}")
    if (code / "untracked").is_dir():
        shutil.copytree(code / "untracked", root, dirs_exist_ok=True)
    return root


# ----------------------------------------------------------------------------------------- mlflow

def export_mlflow(uri: str, experiment: str) -> dict:
    """Every run of the study's experiment: info, params, tags, and each metric's full history."""
    import logging

    for name in ("alembic", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return {"experiment": experiment, "uri": uri, "runs": []}
    runs = []
    for run in client.search_runs([exp.experiment_id], max_results=50000, order_by=["attributes.start_time ASC"]):
        metrics = {}
        for key in sorted(run.data.metrics):
            metrics[key] = [{"step": m.step, "value": m.value, "timestamp": m.timestamp}
                            for m in client.get_metric_history(run.info.run_id, key)]
        runs.append({
            "run_id": run.info.run_id, "run_name": run.info.run_name, "status": run.info.status,
            "start_time": run.info.start_time, "end_time": run.info.end_time,
            "params": dict(sorted(run.data.params.items())),
            "tags": {k: v for k, v in sorted(run.data.tags.items()) if not k.startswith("mlflow.log-model")},
            "metrics": metrics,
        })
    return {"experiment": experiment, "experiment_id": exp.experiment_id, "uri": uri, "runs": runs}


# ------------------------------------------------------------------------------------------- pack

def _yaml(obj) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False, default_flow_style=False)


def inputs_hashes(results: Path, config: dict) -> dict:
    models = {}
    for name, block in config.get("models", {}).items():
        folder = results / name / "base" / "model"
        if folder.is_dir():
            src = folder / "source.json"
            models[name] = {"source": {k: block.get(k) for k in ("source", "repo", "revision", "path") if block.get(k)},
                            "source_json": json.loads(src.read_text()) if src.is_file() else None,
                            "files": hash_tree(folder, results, hidden=False)}
            if block.get("path"):  # local or gguf: where it was, for a re-run in another directory
                models[name]["resolved_path"] = str(Path(block["path"]).expanduser().resolve())
    datasets = {}
    for name, block in config.get("datasets", {}).items():
        folder = results / "datasets" / name
        if folder.is_dir():
            datasets[name] = {"source": {k: block.get(k) for k in ("source", "repo", "revision", "path", "test_path")
                                         if block.get(k)},
                              "files": hash_tree(folder, results, hidden=False)}
    return {"models": models, "datasets": datasets}


def local_data(config: dict) -> dict:
    """The local dataset files the study read, per dataset: their common folder (``root``), each
    file below it with its sha256, and the config's ``path``/``test_path`` below it (``keys``)."""
    found = {}
    for name, block in config.get("datasets", {}).items():
        files = [Path(f).resolve() for f in local_files(block)]
        if not files:
            continue
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise SnaketuneError(f"dataset {name} read {missing[0]}, which is gone: the bundle cannot carry it. "
                                 "Put it back, or pack without local data (reproduce.include_local_data: false; "
                                 "the bundle then holds its sha256 only)")
        keys = {k: Path(block[k]).expanduser().resolve() for k in ("path", "test_path") if block.get(k)}
        root = Path(os.path.commonpath([p.parent for p in [*files, *keys.values()]]))
        found[name] = {"root": str(root), "keys": {k: str(p.relative_to(root)) for k, p in keys.items()},
                       "files": {str(f.relative_to(root)): sha256_file(f) for f in files}}
    return found


def carry_local_data(local: dict, top: Path) -> None:
    """Copy the local dataset files (``local_data``) into the bundle, under ``inputs/datasets/<name>/``."""
    for name, entry in local.items():
        for rel in entry["files"]:
            target = top / "inputs" / "datasets" / name / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(entry["root"], rel), target)


def place_local_data(top: Path, config: dict, run_dir: Path) -> list[str]:
    """Point the re-run's local datasets at the bundle's copies (under ``run_dir/inputs/datasets``),
    or, for a bundle packed without them, at the original files, which must hold the bytes the study
    read; and its local models at their original path (absolute), else at the bundle's copy of the
    fetched folder where it carries weights. Edits ``config``; returns the problems."""
    problems = []
    inputs = json.loads((top / "hashes" / "inputs.json").read_text())
    for name, entry in inputs.get("models", {}).items():
        if "resolved_path" not in entry:
            continue
        block, original = config["models"][name], Path(entry["resolved_path"])
        carried = top / "results" / name / "base" / "model"
        if original.exists():
            block["path"] = str(original)
        elif block["source"] == "local" and any(is_weight(f) for f in carried.glob("*")):
            shutil.copytree(carried, run_dir / "inputs" / "models" / name)
            block["path"] = str(Path("inputs", "models", name))
        else:
            problems.append(f"model {name}: {original} is not on this machine, and the bundle does not carry "
                            "its weights (reproduce.include_weights: false): put it there, or use a bundle packed "
                            "with include_weights: true")
    for name, entry in inputs.get("local_data", {}).items():
        block, carried = config["datasets"][name], top / "inputs" / "datasets" / name
        if carried.is_dir():
            shutil.copytree(carried, run_dir / "inputs" / "datasets" / name)
            block.update({k: str(Path("inputs", "datasets", name, rel)) for k, rel in entry["keys"].items()})
            continue
        for rel, digest in entry["files"].items():
            file = Path(entry["root"], rel)
            if not file.is_file():
                problems.append(f"dataset {name}: {file} is not on this machine, and the bundle holds only its "
                                "sha256 (packed with reproduce.include_local_data: false): put the file there")
            elif (here := sha256_file(file)) != digest:
                problems.append(f"dataset {name}: {file} is not the file the study read (sha256 {digest[:12]} "
                                f"in the bundle, {here[:12]} here)")
        block.update({k: str(Path(entry["root"], rel)) for k, rel in entry["keys"].items()})
    return problems


def flat_inputs(inputs: dict) -> dict[str, str]:
    return {path: digest for section in ("models", "datasets") for entry in inputs.get(section, {}).values()
            for path, digest in entry["files"].items()}


README = """# Reproduction bundle: study `{study}`

Packed {created} from snaketune commit `{commit}`{dirty}. Device: {device}.

## What is here

| path | what |
|---|---|
| `config.yaml` | the study's resolved config (every schema default filled in) |
| `reproduce.json` | the {n_metrics} metrics to reproduce, and the tolerances they are compared with |
| `code/source.tar.gz` | the workflow code at commit `{commit}` (`git archive`){diff_line} |
| `env/lock.json`, `env/requirements.lock` | Python {python}, {n_packages} packages at exact versions, torch {torch}{gpu_line} |
| `hashes/inputs.json` | sha256 of every input file: base model weights and tokenizer, dataset splits, local dataset files; with their sources |{inputs_line}
| `hashes/artifacts.json` | sha256 of every artifact under `results/` (weights included) |
| `results/` | eval JSON, `summary.md`/`summary.json`, `training.json` (loss per step), manifests, benchmarks, logs, plots{weights_line} |
| `mlflow/runs.json` | the {n_runs} MLflow runs of the study: params, tags, metric histories |
| `report.html` | the Snakemake report (plots, rule graph, runtimes){report_line} |
| `MANIFEST.json` | sha256 of every file of this bundle |

## Results

{summary}

## Reproduce

With snaketune set up (`git clone` the repository, `make setup`; or the packages of
`env/requirements.lock` in a virtual environment with `pip install -e .` of the bundled code):

```bash
.venv/bin/python -m snaketune.bundle verify {name}.tar.gz              # checks, shows the code it would run
.venv/bin/python -m snaketune.bundle verify --run-bundle-code {name}.tar.gz   # the whole study
.venv/bin/python -m snaketune.bundle verify --run-bundle-code {name}.tar.gz \\
    --targets results/{example_target}                                   # one number
```

`verify` checks every file of the bundle against `MANIFEST.json` and that this README, the summary
and the result files show the numbers of `reproduce.json`; with `--run-bundle-code` it rebuilds the bundled code
(commit + `code/dirty.diff`), re-runs the study from `config.yaml` with Snakemake in a fresh
directory (`--workdir DIR` to keep it), compares every metric of `reproduce.json` with the new
run and prints `metric | bundled | new | delta | tol | result`. It exits 1 if any file was
altered or any metric is outside its tolerance ({tol_line}).

By hand, without `verify`:

```bash
mkdir src && tar -xzf code/source.tar.gz -C src && cd src/snaketune-*{apply}
make setup && cp ../../config.yaml . && .venv/bin/snakemake --cores 2
```

then compare `results/summary.md` with the table above.
{weights_note}"""


def pack(config: dict, repo: Path, out: Path, results: Path = Path("results"), include_weights: bool = False,
         report: Path | None = None, make_report: list[str] | None = None) -> dict:
    """Write the bundle ``out`` (tar.gz) of the finished study in ``results``; returns its summary."""
    from snaketune.tracking import resolve_uri

    study = config["study"]
    include_weights = include_weights or config.get("reproduce", {}).get("include_weights", False)
    staging_root = Path(tempfile.mkdtemp(prefix=".bundle-", dir=out.parent if out.parent.is_dir() else None))
    try:
        top = staging_root / study
        top.mkdir(parents=True)
        (top / "config.yaml").write_text(_yaml(config))
        git = pack_code(repo, top / "code")
        env = environment()
        (top / "env").mkdir()
        (top / "env" / "lock.json").write_text(json.dumps(env, indent=2) + "\n")
        (top / "env" / "requirements.lock").write_text(
            "".join(f"{k}=={v}\n" for k, v in env["packages"].items()))
        (top / "hashes").mkdir()
        inputs = {**inputs_hashes(results, config), "local_data": local_data(config)}
        (top / "hashes" / "inputs.json").write_text(json.dumps(inputs, indent=2, sort_keys=True) + "\n")
        carry_data = config["reproduce"]["include_local_data"] and inputs["local_data"]
        if carry_data:
            carry_local_data(inputs["local_data"], top)
        files = result_files(results)
        (top / "hashes" / "artifacts.json").write_text(json.dumps(
            {str(Path("results") / f): sha256_file(results / f) for f in files}, indent=2) + "\n")
        copied = weights_left = 0
        for rel in files:
            if is_weight(rel) and not include_weights:
                weights_left += 1
                continue
            target = top / "results" / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(results / rel, target)
            copied += 1
        metrics = collect_metrics(results)
        rep = config.get("reproduce", {})
        (top / "reproduce.json").write_text(json.dumps({
            "study": study, "device": "gpu" if uses_gpu(env) else "cpu",
            "tolerance": rep.get("tolerance", {}), "tolerance_from": "config.yaml reproduce.tolerance",
            "metrics": metrics,
        }, indent=2) + "\n")
        uri = resolve_uri(config.get("tracking", {}).get("uri"))
        (top / "mlflow").mkdir()
        runs = export_mlflow(uri, study)
        (top / "mlflow" / "runs.json").write_text(json.dumps(runs, indent=1) + "\n")
        report_note = ""
        if make_report:
            report = top / "report.html"
            if make_report[0] == "snakemake":  # the snakemake of this Python, whatever PATH says
                make_report = [sys.executable, "-m", "snakemake", *make_report[1:]]
            cmd = make_report + ["--configfile", str((top / "config.yaml").resolve()), "--report", str(report.resolve())]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0 or not report.is_file():
                report_note = " (could not be built: see the bundle step's log)"
                print(done.stdout[-3000:] + done.stderr[-3000:], file=sys.stderr)
        elif report and Path(report).is_file():
            shutil.copy2(report, top / "report.html")
        if not (top / "report.html").is_file():
            report_note = report_note or " (not built for this bundle)"
        summary_md = results / "summary.md"
        eval_example = next((k for k in metrics if k.startswith("eval/")), "eval/m/v/b.x")
        model, *variant, bench = eval_example.split("/", 1)[1].rsplit(".", 1)[0].split("/")
        tol = rep.get("tolerance", {})
        device = "GPU" if uses_gpu(env) else "CPU"
        (top / "README.md").write_text(README.format(
            study=study, name=out.name.removesuffix(".tar.gz"),
            created=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            commit=git["commit"], dirty=" with uncommitted changes (`code/dirty.diff`)" if git["dirty"] else "",
            device=f"{device}" + (f" ({', '.join(env['gpus'])}, driver {env['driver']})" if env["gpus"] else ""),
            n_metrics=len(metrics),
            diff_line="; `code/dirty.diff` and `code/untracked/`: the uncommitted changes" if git["dirty"] else "",
            python=env["python"], n_packages=len(env["packages"]),
            torch=(env["torch"] or {}).get("version"),
            gpu_line=f", CUDA {(env['torch'] or {}).get('cuda')}" if uses_gpu(env) else " (CPU build)"
            if not (env["torch"] or {}).get("cuda") else f" (CUDA {(env['torch'] or {}).get('cuda')} build)",
            weights_line=" and weights" if include_weights else
            f"; {weights_left} weight files left out (hashes in `hashes/`)",
            n_runs=len(runs["runs"]), report_line=report_note,
            inputs_line="\n| `inputs/datasets/` | the local dataset files the study read (`path`, `test_path`, the images "
                        "their rows name), as they were; verify re-runs from these |" if carry_data else "",
            summary=summary_md.read_text().strip() if summary_md.is_file() else "(no summary.md)",
            example_target=f"{model}/{'/'.join(variant)}/eval/{bench}.json",
            tol_line="on CPU: exact unless `reproduce.tolerance.cpu` says otherwise; on GPU: "
                     f"`reproduce.tolerance.gpu` = {json.dumps(tol.get('gpu', {}))}",
            apply=" && git apply ../../code/dirty.diff && cp -r ../../code/untracked/. ." if git["dirty"] else "",
            weights_note="" if include_weights else
            "\nWeights are not in this bundle: the base model comes from its source (`hashes/inputs.json` "
            "names it and the sha256 of every file); every trained weight is rebuilt by the run and its "
            "sha256 is in `hashes/artifacts.json`. Pack with `reproduce.include_weights: true` (or "
            "`--include-weights`) to carry them.\n"))
        manifest = hash_tree(top)
        (top / "MANIFEST.json").write_text(json.dumps({"algorithm": "sha256", "files": manifest}, indent=1) + "\n")
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(out, "wb") as fh:
            write_tar(top, fh)
        return {"bundle": str(out), "bytes": out.stat().st_size, "files": len(manifest), "copied": copied,
                "weights_left_out": weights_left, "metrics": len(metrics), "mlflow_runs": len(runs["runs"]),
                "commit": git["commit"], "dirty": git["dirty"]}
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)


def write_tar(top: Path, fh) -> None:
    """A tar.gz of ``top`` with sorted entries, no owners and fixed times (same files, same bytes)."""
    import gzip

    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0
        return info

    with gzip.GzipFile(fileobj=fh, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        paths = [top, *sorted(top.rglob("*"))]
        for p in paths:
            tar.add(p, arcname=str(p.relative_to(top.parent)), recursive=False, filter=clean)


# ----------------------------------------------------------------------------------------- verify

def check_manifest(top: Path) -> list[str]:
    """Problems of an unpacked bundle against its MANIFEST.json: altered, missing, unexpected files."""
    path = top / "MANIFEST.json"
    if not path.is_file():
        return ["MANIFEST.json: missing (not a snaketune bundle?)"]
    try:
        listed = json.loads(path.read_text())["files"]
    except (json.JSONDecodeError, KeyError):
        return ["MANIFEST.json: unreadable"]
    problems = []
    present = {str(f.relative_to(top)) for f in top.rglob("*") if f.is_file()} - {"MANIFEST.json"}
    for rel, digest in sorted(listed.items()):
        if rel not in present:
            problems.append(f"{rel}: missing")
        elif sha256_file(top / rel) != digest:
            problems.append(f"{rel}: sha256 differs from MANIFEST.json (file altered)")
    problems += [f"{rel}: not listed in MANIFEST.json (file added)" for rel in sorted(present - set(listed))]
    return problems


def unpack(bundle: Path, dest: Path) -> Path:
    """Extract the bundle into ``dest`` after checking every member (nothing is extracted when one
    is refused): paths inside ``dest`` (no absolute paths, no ``..``, no links leading out), and
    exactly one top folder with nothing beside it."""
    if not bundle.is_file():
        raise SnaketuneError(f"bundle {bundle} does not exist")
    try:
        with tarfile.open(bundle) as tar:
            members = tar.getmembers()
            refused = []
            for member in members:
                if os.path.isabs(member.name) or ".." in Path(member.name).parts:
                    refused.append(f"{member.name}: an absolute path or '..'")
                    continue
                try:
                    tarfile.data_filter(member, str(dest))
                except tarfile.FilterError as exc:
                    refused.append(f"{member.name}: {exc}")
            if refused:
                raise SnaketuneError(f"{bundle}: refused, nothing extracted: " + "; ".join(refused[:5]))
            tops = sorted({Path(m.name).parts[0] for m in members})
            beside = [m.name for m in members if len(Path(m.name).parts) == 1 and not m.isdir()]
            if len(tops) != 1 or beside:
                raise SnaketuneError(f"{bundle}: a bundle holds one study folder and nothing beside it; found "
                                     f"{tops}" + (f" (files at the top: {beside})" if beside else "")
                                     + " — nothing extracted")
            tar.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise SnaketuneError(f"{bundle} is not a readable tar.gz bundle: {exc}") from None
    return dest / tops[0]


def displayed_problems(top: Path, spec: dict) -> list[str]:
    """Numbers a reader of the bundle sees that are not the ones ``reproduce.json`` holds (and
    verify re-checks): the eval and training JSON under results/, summary.json, summary.md and the
    summary table in README.md."""
    from snaketune.summary import markdown

    metrics = spec.get("metrics", {})
    shown = collect_metrics(top / "results")
    problems = [f"{key}: the bundle's results/ say {shown[key]!r}, reproduce.json {metrics[key]!r}"
                for key in sorted(set(shown) & set(metrics)) if shown[key] != metrics[key]]
    problems += [f"{key}: in reproduce.json but no file of the bundle's results/ shows it"
                 for key in sorted(set(metrics) - set(shown))]
    problems += [f"{key}: in the bundle's results/ but not in reproduce.json" for key in sorted(set(shown) - set(metrics))]
    summary_json, summary_md = top / "results" / "summary.json", top / "results" / "summary.md"
    if summary_json.is_file():
        rows = json.loads(summary_json.read_text())["rows"]
        for r in rows:
            key = f"eval/{r['model']}/{r['variant']}/{r['bench']}.{r['metric']}"
            if metrics.get(key) != r["score"]:
                problems.append(f"results/summary.json: {key} is {r['score']!r}, reproduce.json {metrics.get(key)!r}")
        if summary_md.is_file() and summary_md.read_text() != markdown(rows):
            problems.append("results/summary.md: its table is not the one summary.json gives")
    readme = (top / "README.md").read_text() if (top / "README.md").is_file() else ""
    if summary_md.is_file() and summary_md.read_text().strip() not in readme:
        problems.append("README.md: its summary table is not results/summary.md")
    return problems


def code_provenance(code: Path) -> str:
    """What verify would run: the commit, where from, and the files the bundle changes or adds."""
    git = json.loads((code / "git.json").read_text()) if (code / "git.json").is_file() else {}
    lines = [f"  commit {git.get('commit', '?')} ({git.get('branch') or 'no branch'}, "
             f"remote {git.get('remote') or 'none'})"]
    diff = code / "dirty.diff"
    if diff.is_file():
        changed = sorted({ln[6:] for ln in diff.read_text().splitlines() if ln.startswith("+++ b/")})
        lines.append(f"  changed against that commit (code/dirty.diff): {', '.join(changed) or 'nothing'}")
    untracked = code / "untracked"
    if untracked.is_dir():
        added = sorted(str(f.relative_to(untracked)) for f in untracked.rglob("*") if f.is_file())
        lines.append(f"  files not in that commit (code/untracked/): {', '.join(added) or 'none'}")
    return "\n".join(lines)


def _init_tracking(run_dir: Path) -> None:
    """Create the run's MLflow SQLite schema before any job: concurrent first jobs race on it."""
    import logging

    import mlflow

    from snaketune.tracking import _setup

    for name in ("alembic", "mlflow"):  # after the import: mlflow sets its own level on import
        logging.getLogger(name).setLevel(logging.WARNING)

    (run_dir / "results").mkdir(parents=True, exist_ok=True)
    _setup(mlflow, f"sqlite:///{(run_dir / 'results' / 'mlflow.db').resolve()}", "verify-init")


def env_differences(bundled: dict, current: dict) -> list[str]:
    diffs = []
    if "cpu" in bundled and bundled["cpu"] != current.get("cpu"):
        describe = lambda cpu: ", ".join(f"{k} {v}" for k, v in sorted(cpu.items())) or "unknown"  # noqa: E731
        diffs.append(f"CPU {describe(bundled['cpu'])} -> {describe(current.get('cpu') or {})} (CPU runs are bitwise "
                     "reproducible per CPU model and kernel settings: on another, CPU metrics need "
                     "reproduce.tolerance.cpu)")
    if bundled.get("python") != current.get("python"):
        diffs.append(f"python {bundled.get('python')} -> {current.get('python')}")
    old, new = bundled.get("packages", {}), current.get("packages", {})
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            diffs.append(f"{name} {old.get(name, '-')} -> {new.get(name, '-')}")
    return diffs


def verify(bundle: Path, targets: list[str] | None = None, workdir: Path | None = None, cores: int = 2,
           code: str = "bundle", run_bundle_code: bool = False, out=sys.stdout) -> int:
    """Check, re-run and compare; returns the exit code (0 all pass, 1 any failure, 3 the bundle's
    code was not run because ``run_bundle_code`` was not given)."""
    t0 = time.time()
    workdir = Path(workdir or tempfile.mkdtemp(prefix="snaketune-verify-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if any(workdir.iterdir()):
        raise SnaketuneError(f"--workdir {workdir} is not empty: verify re-runs the study in a fresh directory")
    top = unpack(Path(bundle), workdir / "bundle")
    print(f"bundle {bundle}: study {top.name}, unpacked in {workdir / 'bundle'}", file=out)
    problems = check_manifest(top)
    if problems:
        print("bundle hash check FAILED:", file=out)
        for p in problems:
            print(f"  {p}", file=out)
        return EXIT_FAILED
    print(f"bundle hash check: {len(json.loads((top / 'MANIFEST.json').read_text())['files'])} files ok", file=out)
    spec = json.loads((top / "reproduce.json").read_text())
    problems = displayed_problems(top, spec)
    if problems:
        print("bundle numbers check FAILED (what the bundle shows is not what it claims to reproduce):", file=out)
        for p in problems:
            print(f"  {p}", file=out)
        return EXIT_FAILED
    print(f"bundle numbers check: results/, summary and README.md show reproduce.json's {len(spec['metrics'])} "
          "metrics", file=out)
    if code == "bundle" and not run_bundle_code:
        print("verify re-runs the bundle's own code (Snakefile, rules, scripts), which can do anything you can:\n"
              + code_provenance(top / "code")
              + "\nRead it (unpacked in " + str(top / "code") + "), then run again with --run-bundle-code, or with "
              "--code current to re-run the study with this checkout's code instead.", file=out)
        return EXIT_NEEDS_CONSENT

    import yaml

    config = yaml.safe_load((top / "config.yaml").read_text())
    config.setdefault("tracking", {})["uri"] = ""  # the re-run logs into its own directory
    env_now = environment()
    env_then = json.loads((top / "env" / "lock.json").read_text())
    for line in env_differences(env_then, env_now)[:20]:
        print(f"  environment differs: {line}", file=out)
    gpu = spec.get("device") == "gpu" or uses_gpu(env_now)
    # the tolerances declared in the bundled config (reproduce.tolerance.cpu|gpu; exact where none)
    tolerances = ((config.get("reproduce") or {}).get("tolerance") or {}).get("gpu" if gpu else "cpu") or {}

    if code == "bundle":
        root = unpack_code(top / "code", workdir / "code")
        snakefile, pythonpath = root / "workflow" / "Snakefile", str(root / "scripts")
    else:
        root = Path(__file__).resolve().parents[2]
        snakefile, pythonpath = root / "workflow" / "Snakefile", str(root / "scripts")
    run_dir = workdir / "run"
    run_dir.mkdir()
    problems = place_local_data(top, config, run_dir)
    if problems:
        print("the re-run cannot start: a local dataset or model is missing or changed:", file=out)
        for p in problems:
            print(f"  {p}", file=out)
        return EXIT_FAILED
    (run_dir / "config.yaml").write_text(_yaml(config))
    _init_tracking(run_dir)
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(snakefile), "--directory", str(run_dir),
           "--configfile", str(run_dir / "config.yaml"), "--cores", str(cores),
           *(targets or rerun_targets(top / "results"))]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
           "PYTHONPATH": pythonpath + (f":{os.environ['PYTHONPATH']}" if os.environ.get("PYTHONPATH") else "")}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("SNAKETUNE_TRACKING", None)
    print(f"re-running {'targets ' + ' '.join(targets) if targets else 'the study'} with {snakefile} in {run_dir} "
          f"({'GPU' if gpu else 'CPU'})", file=out, flush=True)
    log = workdir / "snakemake.log"
    with open(log, "w") as fh:
        done = subprocess.run(cmd, cwd=run_dir, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        print(f"the re-run FAILED (snakemake exit {done.returncode}); last lines of {log}:", file=out)
        print("\n".join(log.read_text().splitlines()[-40:]), file=out)
        return EXIT_FAILED

    new = collect_metrics(run_dir / "results")
    rows = compare(spec["metrics"], new, tolerances, only_new=bool(targets))
    if not rows:
        print("no metric of the bundle was rebuilt by these targets", file=out)
        return EXIT_FAILED
    # inputs (base model weights, tokenizer, datasets) must be byte-identical wherever rebuilt
    inputs_then = flat_inputs(json.loads((top / "hashes" / "inputs.json").read_text()))
    inputs_now = flat_inputs(inputs_hashes(run_dir / "results", config))
    for path in sorted(p for p in set(inputs_then) & set(inputs_now) if Path(p).name not in RECORDS):
        same = inputs_then[path] == inputs_now[path]
        rows.append({"metric": f"input sha256 {path}", "bundled": inputs_then[path][:12], "new": inputs_now[path][:12],
                     "delta": None, "tol": "exact", "ok": same, "why": ""})
    artifacts_then = json.loads((top / "hashes" / "artifacts.json").read_text())
    weights = [p for p in artifacts_then if is_weight(Path(p)) and (run_dir / p).is_file()]
    same_weights = [p for p in weights if sha256_file(run_dir / p) == artifacts_then[p]]
    print(table(rows), file=out)
    failed = [r["metric"] for r in rows if not r["ok"]]
    print(f"weights: {len(same_weights)} of {len(weights)} rebuilt weight files byte-identical to the bundle's hashes"
          + ("" if len(same_weights) == len(weights) else
             f" (differ: {', '.join(p for p in weights if p not in same_weights)})"), file=out)
    verdict = "FAILED" if failed else "REPRODUCED"
    print(f"{verdict}: {len(rows) - len(failed)} of {len(rows)} checks pass in {time.time() - t0:.0f} s"
          + (f"; failing: {', '.join(failed)}" if failed else ""), file=out)
    return EXIT_FAILED if failed else 0


# --------------------------------------------------------------------------------------------- cli

@cli
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m snaketune.bundle", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="pack a finished study (what the bundle rule runs)")
    p.add_argument("--config", required=True, help="the resolved config as a JSON object (or @file)")
    p.add_argument("--results", default="results")
    p.add_argument("--repo", default=".", help="a path inside the git checkout of the workflow code")
    p.add_argument("--out", required=True, help="results/bundles/<study>.tar.gz")
    p.add_argument("--include-weights", action="store_true", help="copy weight files too (default: hashes only)")
    p.add_argument("--report", help="an existing Snakemake report HTML to include")
    p.add_argument("--make-report", help="JSON list: the snakemake command that builds the report (--report FILE is "
                                         "appended)")
    v = sub.add_parser("verify", help="check a bundle's hashes, re-run it, compare every metric")
    v.add_argument("bundle")
    v.add_argument("--targets", nargs="+", help="re-run only these Snakemake targets (default: the whole study)")
    v.add_argument("--workdir", help="fresh directory for the re-run (default: a new temporary one, kept)")
    v.add_argument("--cores", type=int, default=2)
    v.add_argument("--code", choices=["bundle", "current"], default="bundle",
                   help="run the bundled workflow code (default) or this checkout's")
    v.add_argument("--run-bundle-code", action="store_true",
                   help="agree to run the bundle's code (without it verify shows where the code comes from and stops)")
    args = ap.parse_args(argv)
    if args.command == "pack":
        raw = Path(args.config[1:]).read_text() if args.config.startswith("@") else args.config
        info = pack(json.loads(raw), Path(args.repo), Path(args.out), Path(args.results), args.include_weights,
                    Path(args.report) if args.report else None,
                    json.loads(args.make_report) if args.make_report else None)
        print(f"bundle {info['bundle']}: {info['bytes'] / 1e6:.2f} MB, {info['files']} files, {info['metrics']} metrics, "
              f"{info['mlflow_runs']} MLflow runs, {info['weights_left_out']} weight files left out (hashes only), "
              f"commit {info['commit'][:12]}{' + diff' if info['dirty'] else ''}")
        return
    sys.exit(verify(Path(args.bundle), args.targets, Path(args.workdir) if args.workdir else None, args.cores,
                    args.code, args.run_bundle_code))


if __name__ == "__main__":
    main()
