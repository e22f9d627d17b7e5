"""Reproduction bundles: `snakemake bundle` packs the small study; `python -m snaketune.bundle verify`
re-runs it in a clean directory and passes; an altered file fails the hash check with its name; a
metric pushed outside its tolerance fails with the metric named."""

import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
import yaml

from snaketune.bundle import check_manifest, compare, sha256_file, table, tolerance_for, write_tar
from conftest import Background, finished_study
from test_determinism import MODEL

STUDY = "demo"


# ---------------------------------------------------------------------- fast: comparison logic

def test_tolerance_lookup_full_name_then_short_name_then_default():
    tol = {"eval/m/v/b.exact_match": 0.1, "exact_match": 0.02, "default": 0.5}
    assert tolerance_for("eval/m/v/b.exact_match", tol) == 0.1
    assert tolerance_for("eval/m/w/b.exact_match", tol) == 0.02
    assert tolerance_for("train/m/r.final_loss", tol) == 0.5
    assert tolerance_for("train/m/r.final_loss", {}) == 0.0


def test_compare_within_and_outside_tolerance():
    bundled = {"eval/m/v/b.exact_match": 0.5, "eval/m/v/b.n": 200, "train/m/r.loss_history": [[5, 2.0], [10, 1.0]]}
    new = {"eval/m/v/b.exact_match": 0.51, "eval/m/v/b.n": 200, "train/m/r.loss_history": [[5, 2.0], [10, 1.0]]}
    rows = {r["metric"]: r for r in compare(bundled, new, {"exact_match": 0.02}, only_new=False)}
    assert all(r["ok"] for r in rows.values())
    rows = {r["metric"]: r for r in compare(bundled, new, {}, only_new=False)}
    assert not rows["eval/m/v/b.exact_match"]["ok"] and rows["eval/m/v/b.n"]["ok"]
    new["train/m/r.loss_history"] = [[5, 2.0], [10, 1.1]]
    rows = {r["metric"]: r for r in compare(bundled, new, {"loss_history": 0.05}, only_new=False)}
    assert not rows["train/m/r.loss_history"]["ok"]
    text = table(list(rows.values()))
    assert text.splitlines()[0].split("|")[1].strip() == "metric" and "FAIL" in text
    # a metric the re-run did not produce fails unless only named targets were re-run
    del new["eval/m/v/b.n"]
    assert not {r["metric"]: r for r in compare(bundled, new, {}, False)}["eval/m/v/b.n"]["ok"]
    assert "eval/m/v/b.n" not in {r["metric"] for r in compare(bundled, new, {}, True)}


# ------------------------------------------------------------------ slow: the real study's bundle



@pytest.fixture(scope="module")
def bundle(small_study) -> Path:
    path = small_study / f"results/bundles/{STUDY}.tar.gz"
    assert path.is_file()
    return path


@pytest.fixture(scope="module")
def unpacked(bundle, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("unpacked")
    with tarfile.open(bundle) as tar:
        tar.extractall(dest, filter="data")
    return dest / STUDY


def verify(bundle: Path, workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snaketune.bundle", "verify", str(bundle), "--workdir", str(workdir),
                           *args], capture_output=True, text=True, timeout=1500)


def repack(top: Path, out: Path, refresh_manifest: bool) -> Path:
    if refresh_manifest:
        files = {str(f.relative_to(top)): sha256_file(f) for f in sorted(top.rglob("*"))
                 if f.is_file() and f.name != "MANIFEST.json"}
        (top / "MANIFEST.json").write_text(json.dumps({"algorithm": "sha256", "files": files}))
    with open(out, "wb") as fh:
        write_tar(top, fh)
    return out


@pytest.mark.slow
def test_bundle_holds_everything_the_issue_lists(unpacked):
    top = unpacked
    for rel in ("README.md", "config.yaml", "reproduce.json", "code/source.tar.gz", "code/git.json",
                "env/lock.json", "env/requirements.lock", "hashes/inputs.json", "hashes/artifacts.json",
                "mlflow/runs.json", "report.html", "MANIFEST.json", "results/summary.md", "results/summary.json",
                f"results/{MODEL}/base/eval/arith.json", f"results/{MODEL}/sft-lora/eval/arith.json",
                f"results/{MODEL}/sft-lora/adapter/training.json", f"results/{MODEL}/base/model/source.json",
                "results/datasets/arith/manifest.json", "results/report/loss.png"):
        assert (top / rel).is_file(), rel
    assert check_manifest(top) == []
    config = yaml.safe_load((top / "config.yaml").read_text())
    assert config["study"] == STUDY and config["reproduce"] == {"include_weights": False,
                                                               "tolerance": {"cpu": {}, "gpu": {}}}
    assert config["recipes"]["sft-lora"]["lora"]["dropout"] == 0.0  # schema defaults resolved
    # no weights by default; their hashes are there
    assert not [p for p in top.rglob("*.safetensors")]
    artifacts = json.loads((top / "hashes/artifacts.json").read_text())
    assert f"results/{MODEL}/sft-lora/adapter/adapter_model.safetensors" in artifacts
    inputs = json.loads((top / "hashes/inputs.json").read_text())
    model_files = inputs["models"][MODEL]["files"]
    assert f"{MODEL}/base/model/model.safetensors" in model_files
    assert any("tokenizer" in f for f in model_files)
    assert set(inputs["datasets"]["arith"]["files"]) >= {"datasets/arith/train.jsonl", "datasets/arith/test.jsonl"}
    env = json.loads((top / "env/lock.json").read_text())
    from importlib.metadata import version

    assert env["packages"]["snakemake"] == version("snakemake") and env["torch"]["version"].startswith("2.")
    assert env["python"] == sys.version.split()[0]
    git = json.loads((top / "code/git.json").read_text())
    assert len(git["commit"]) == 40
    with tarfile.open(top / "code/source.tar.gz") as tar:
        assert any(n.endswith("workflow/Snakefile") for n in tar.getnames())
    runs = json.loads((top / "mlflow/runs.json").read_text())["runs"]
    train = [r for r in runs if r["tags"].get("snakemake.rule") == "train_adapter"]
    assert train and len(train[0]["metrics"]["loss"]) >= 4 and train[0]["params"]["max_steps"] == "20"
    spec = json.loads((top / "reproduce.json").read_text())
    assert spec["device"] == "cpu" and f"eval/{MODEL}/sft-lora/arith.exact_match" in spec["metrics"]
    readme = (top / "README.md").read_text()
    assert "python -m snaketune.bundle verify" in readme and "| sft-lora |" in readme
    report = (top / "report.html").read_text()
    assert "loss.png" in report and "eval_scores.png" in report


def verify_small_study() -> tuple[Path, subprocess.CompletedProcess]:
    """`verify` of the small study's bundle in a clean directory, run in the background from
    collection on (``background_start``): it waits for the small study, then re-runs it from the
    bundle while the other tests go on."""
    work = finished_study("small_study").work
    tmp = Path(tempfile.mkdtemp(prefix="snaketune-verify-"))
    return tmp, verify(work / f"results/bundles/{STUDY}.tar.gz", tmp / "verify")


VERIFY = Background("bundle-verify", verify_small_study)


def background_start(wanted: set[str]) -> None:
    """Called by conftest.py once the tests are collected, with every fixture they use."""
    if "verified" in wanted:
        VERIFY.start()


@pytest.fixture(scope="module")
def verified():
    import shutil

    tmp, result = VERIFY.wait()
    yield result
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
def test_verify_reproduces_the_study_in_a_clean_directory(verified):
    result = verified
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-6000:]
    assert "bundle hash check:" in out and "REPRODUCED" in out
    header = next(ln for ln in out.splitlines() if ln.startswith("| metric"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["metric", "bundled", "new", "delta", "tol", "result"]
    rows = [ln for ln in out.splitlines() if ln.startswith("| eval/") or ln.startswith("| train/")]
    assert any(f"eval/{MODEL}/sft-lora/arith.exact_match" in r and "pass" in r for r in rows)
    assert any(f"train/{MODEL}/sft-lora.loss_history" in r and "pass" in r for r in rows)
    assert not any("FAIL" in r for r in rows)
    assert "weights: " in out and " of " in out


@pytest.mark.slow
def test_altered_file_fails_the_hash_check_with_its_name(bundle, unpacked, tmp_path):
    import shutil

    top = tmp_path / STUDY
    shutil.copytree(unpacked, top)
    summary = top / "results/summary.md"
    summary.write_text(summary.read_text().replace("| base |", "| base  |", 1))
    result = verify(repack(top, tmp_path / "tampered.tar.gz", refresh_manifest=False), tmp_path / "verify")
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "hash check FAILED" in out and "results/summary.md" in out
    assert "re-running" not in out


@pytest.mark.slow
def test_metric_outside_its_tolerance_fails_with_the_metric_named(bundle, unpacked, tmp_path):
    import shutil

    top = tmp_path / STUDY
    shutil.copytree(unpacked, top)
    spec = json.loads((top / "reproduce.json").read_text())
    key = f"eval/{MODEL}/base/arith.exact_match"
    spec["metrics"][key] += 0.5
    (top / "reproduce.json").write_text(json.dumps(spec))
    config = yaml.safe_load((top / "config.yaml").read_text())
    config["reproduce"]["tolerance"]["cpu"] = {"exact_match": 0.02}  # declared in the config; 0.5 is outside
    (top / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    pushed = repack(top, tmp_path / "pushed.tar.gz", refresh_manifest=True)
    result = verify(pushed, tmp_path / "verify", "--targets", f"results/{MODEL}/base/eval/arith.json")
    out = result.stdout + result.stderr
    assert result.returncode == 1, out[-6000:]
    line = next(ln for ln in out.splitlines() if ln.startswith(f"| {key} "))
    assert "FAIL" in line and "0.02" in line, line
    assert f"failing: {key}" in out
    assert f"eval/{MODEL}/sft-lora" not in out  # only the named target was re-run and compared
