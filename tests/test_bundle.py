"""Reproduction bundles: `snakemake bundle` packs the small study; `python -m snaketune.bundle verify`
re-runs it in a clean directory and passes; an altered file fails the hash check with its name; a
metric pushed outside its tolerance fails with the metric named."""

import json
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from snaketune.bundle import (EXIT_NEEDS_CONSENT, check_manifest, compare, env_differences, environment, rerun_targets,
                              sha256_file, table, tolerance_for, write_tar)
from snaketune.bundle import verify as verify_in_process
from conftest import verify_bundle
from test_determinism import MODEL

STUDY = "demo"


# ---------------------------------------------------------------------- fast: comparison logic

def test_tolerance_lookup_full_name_then_short_name_then_default():
    tol = {"eval/m/v/b.exact_match": 0.1, "exact_match": 0.02, "default": 0.5}
    assert tolerance_for("eval/m/v/b.exact_match", tol) == 0.1
    assert tolerance_for("eval/m/w/b.exact_match", tol) == 0.02
    assert tolerance_for("train/m/r.final_loss", tol) == 0.5
    assert tolerance_for("train/m/r.final_loss", {}) == 0.0


def test_another_cpu_model_or_kernel_setting_is_named_among_the_environment_differences(monkeypatch):
    """The lock records the CPU model and the kernels torch uses (and any variable that pins them):
    verify names a change, since exact CPU metrics hold per CPU model only (benchmarks/cross_cpu.py)."""
    bundled = environment()
    assert bundled["cpu"]["model"] and bundled["cpu"]["capability"]
    assert not [d for d in env_differences(bundled, environment()) if d.startswith("CPU")]
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    (line,) = [d for d in env_differences(bundled, environment()) if d.startswith("CPU")]
    assert "-> MKL_CBWR COMPATIBLE, capability" in line and "reproduce.tolerance.cpu" in line
    assert not [d for d in env_differences({k: v for k, v in bundled.items() if k != "cpu"}, bundled)
                if d.startswith("CPU")]  # a bundle from before the CPU was recorded: nothing to compare


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


# ------------------------------------------------- fast: a hand-made bundle, what verify refuses

def fake_bundle(root: Path, score: float = 0.25) -> Path:
    """A minimal consistent bundle folder: one eval JSON, reproduce.json, summary, README, code."""
    from snaketune.summary import markdown

    top = root / STUDY
    (top / "results/m/v/eval").mkdir(parents=True)
    (top / "results/m/v/eval/b.json").write_text(json.dumps({"model": "m", "variant": "v", "bench": "b",
                                                             "metric": "exact_match", "score": score, "n": 4}))
    rows = [{"model": "m", "variant": "v", "bench": "b", "metric": "exact_match", "score": score, "n": 4,
             "size_mb": 1.0, "quantization": None, "serving": None}]
    (top / "results/summary.json").write_text(json.dumps({"rows": rows}))
    (top / "results/summary.md").write_text(markdown(rows))
    (top / "README.md").write_text("# bundle\n\n" + markdown(rows) + "\nverify it\n")
    (top / "reproduce.json").write_text(json.dumps({"metrics": {"eval/m/v/b.exact_match": score, "eval/m/v/b.n": 4}}))
    (top / "code/untracked/workflow").mkdir(parents=True)
    (top / "code/untracked/workflow/Snakefile").write_text("shell('touch /tmp/owned')\n")
    (top / "code/git.json").write_text(json.dumps({"commit": "a" * 40, "branch": "main", "remote": None}))
    (top / "code/dirty.diff").write_text("--- a/scripts/x.py\n+++ b/scripts/x.py\n@@ -1 +1 @@\n-a\n+b\n")
    return top


def run_verify(bundle: Path, workdir, **kw) -> tuple[int, str]:
    import io

    out = io.StringIO()
    return verify_in_process(bundle, workdir=workdir, out=out, **kw), out.getvalue()


def test_verify_shows_the_bundles_code_and_runs_it_only_when_asked(tmp_path, monkeypatch):
    top = fake_bundle(tmp_path / "src")
    bundle = repack(top, tmp_path / "b.tar.gz", refresh_manifest=True)
    monkeypatch.chdir(tmp_path)
    code, out = run_verify(bundle, Path("rel/verify"))  # a relative --workdir works
    assert code == EXIT_NEEDS_CONSENT, out
    assert "bundle hash check:" in out and "bundle numbers check:" in out
    assert "a" * 40 in out and "scripts/x.py" in out and "workflow/Snakefile" in out and "--run-bundle-code" in out
    assert "re-running" not in out and (tmp_path / "rel/verify/bundle" / STUDY / "README.md").is_file()


@pytest.mark.parametrize("edit", ["readme", "summary_md", "summary_json", "eval_json", "extra_eval"])
def test_shown_numbers_must_be_the_reproduced_ones(edit, tmp_path):
    """A bundle edited to show a better score, with MANIFEST.json recomputed, fails before any run."""
    top = fake_bundle(tmp_path / "src")
    path = {"readme": top / "README.md", "summary_md": top / "results/summary.md",
            "summary_json": top / "results/summary.json", "eval_json": top / "results/m/v/eval/b.json"}.get(edit)
    if path is not None:
        path.write_text(path.read_text().replace("0.25", "0.98"))
    else:
        shutil_copy = top / "results/m/w/eval"
        shutil_copy.mkdir(parents=True)
        (shutil_copy / "b.json").write_text(json.dumps({"model": "m", "variant": "w", "bench": "b",
                                                        "metric": "exact_match", "score": 0.98, "n": 4}))
    bundle = repack(top, tmp_path / "b.tar.gz", refresh_manifest=True)
    code, out = run_verify(bundle, tmp_path / "verify", run_bundle_code=True)
    assert code == 1 and "bundle numbers check FAILED" in out, out
    named = {"readme": "README.md", "summary_md": "results/summary.md", "summary_json": "results/summary.json",
             "eval_json": "eval/m/v/b.exact_match", "extra_eval": "eval/m/w/b.exact_match"}[edit]
    assert named in out and "re-running" not in out


def tar_with(members: dict[str, bytes | str], out: Path) -> Path:
    """A tar.gz with regular files (bytes) and symlinks (str: the link target)."""
    import io

    with tarfile.open(out, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(data, str):
                info.type, info.linkname = tarfile.SYMTYPE, data
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return out


@pytest.mark.parametrize("bad", ["../escape.txt", "/abs.txt", f"{STUDY}/link", "beside.txt"])
def test_bad_archive_members_are_refused_before_anything_is_extracted(bad, tmp_path):
    members = {f"{STUDY}/README.md": b"first member, a good one\n"}
    members[bad] = "/etc/passwd" if bad.endswith("link") else b"x"
    bundle = tar_with(members, tmp_path / "bad.tar.gz")
    with pytest.raises(Exception, match="nothing extracted") as err:
        run_verify(bundle, tmp_path / "verify", run_bundle_code=True)
    assert bad.lstrip("/").split("/")[-1] in str(err.value)
    assert not list((tmp_path / "verify").rglob("*.md")) and not (tmp_path / "escape.txt").exists()


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
                f"results/{MODEL}/sft-lora/eval/arith.predictions.jsonl",
                f"results/{MODEL}/sft-lora/adapter/training.json", f"results/{MODEL}/base/model/source.json",
                "results/datasets/arith/manifest.json", "results/report/loss.png"):
        assert (top / rel).is_file(), rel
    assert check_manifest(top) == []
    config = yaml.safe_load((top / "config.yaml").read_text())
    assert config["study"] == STUDY and config["reproduce"] == {"include_weights": False, "include_local_data": True,
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
    names = [r["run_name"] for r in runs]
    assert len(set(names)) == len(names) and {"train sft-lora", "evaluate sft-lora · arith"} <= set(names), names
    spec = json.loads((top / "reproduce.json").read_text())
    assert spec["device"] == "cpu" and f"eval/{MODEL}/sft-lora/arith.exact_match" in spec["metrics"]
    readme = (top / "README.md").read_text()
    assert "python -m snaketune.bundle verify" in readme and "| sft-lora |" in readme
    report = (top / "report.html").read_text()
    assert "loss.png" in report and "eval_scores.png" in report


@pytest.mark.slow
def test_a_whole_study_rerun_builds_every_artifact_the_bundle_has_numbers_of(unpacked, tmp_path):
    """A study may train a model outside its evaluation grid (an extra target, as configs/gpu-e2e.yaml's
    7B LoRA): the H100 verify of 2026-12-06 re-ran only `all` and found those numbers missing. The
    re-run's targets name each artifact a number comes from, and Snakemake knows every one of them."""
    import shutil

    from conftest import snakemake

    results = tmp_path / "results"
    shutil.copytree(unpacked / "results", results)
    extra = results / MODEL / "sft-extra" / "adapter"
    extra.mkdir(parents=True)
    shutil.copy(results / MODEL / "sft-lora" / "adapter" / "training.json", extra / "training.json")
    (results / MODEL / "sft-lora" / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    targets = rerun_targets(results)
    assert targets[0] == "all"
    assert {f"results/{MODEL}/sft-lora/adapter", f"results/{MODEL}/sft-extra/adapter",
            f"results/{MODEL}/base/eval/arith.json", f"results/{MODEL}/sft-lora/eval/arith.json"} <= set(targets)
    assert not [t for t in targets if "checkpoints" in t or "benchmarks" in t or "logs" in t]

    work = tmp_path / "dry"
    work.mkdir()
    config = yaml.safe_load((unpacked / "config.yaml").read_text())
    config["recipes"]["sft-extra"] = config["recipes"]["sft-lora"]
    (work / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    dry = snakemake(work, "-n", *targets, timeout=300)
    assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-3000:]
    assert "train_adapter" in dry.stdout


@pytest.fixture(scope="module")
def verified(small_study_rerun):
    """verify's result for the small study's bundle (conftest.small_study_rerun, run in the
    background from collection on)."""
    return small_study_rerun[1]


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
    result = verify_bundle(repack(top, tmp_path / "tampered.tar.gz", refresh_manifest=False), tmp_path / "verify")
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "hash check FAILED" in out and "results/summary.md" in out
    assert "re-running" not in out


def push_score(top: Path, key: str, delta: float) -> None:
    """Raise one eval score everywhere the bundle shows it (eval JSON, summary, README, reproduce.json),
    as a consistent bundle whose run cannot be reproduced would show it."""
    from snaketune.summary import markdown

    model, *variant, rest = key.split("/")[1:]
    bench = rest.split(".")[0]
    eval_json = top / "results" / model / "/".join(variant) / "eval" / f"{bench}.json"
    record = json.loads(eval_json.read_text())
    record["score"] += delta
    eval_json.write_text(json.dumps(record))
    spec = json.loads((top / "reproduce.json").read_text())
    spec["metrics"][key] = record["score"]
    (top / "reproduce.json").write_text(json.dumps(spec))
    summary = json.loads((top / "results/summary.json").read_text())
    for row in summary["rows"]:
        if (row["model"], row["variant"], row["bench"]) == (model, "/".join(variant), bench):
            row["score"] = record["score"]
    (top / "results/summary.json").write_text(json.dumps(summary))
    old_md = (top / "results/summary.md").read_text()
    (top / "results/summary.md").write_text(markdown(summary["rows"]))
    readme = top / "README.md"
    readme.write_text(readme.read_text().replace(old_md.strip(), markdown(summary["rows"]).strip()))


@pytest.mark.slow
def test_metric_outside_its_tolerance_fails_with_the_metric_named(bundle, unpacked, tmp_path):
    import shutil

    top = tmp_path / STUDY
    shutil.copytree(unpacked, top)
    key = f"eval/{MODEL}/base/arith.exact_match"
    push_score(top, key, 0.5)
    config = yaml.safe_load((top / "config.yaml").read_text())
    config["reproduce"]["tolerance"]["cpu"] = {"exact_match": 0.02}  # declared in the config; 0.5 is outside
    (top / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    pushed = repack(top, tmp_path / "pushed.tar.gz", refresh_manifest=True)
    result = verify_bundle(pushed, tmp_path / "verify", "--targets", f"results/{MODEL}/base/eval/arith.json")
    out = result.stdout + result.stderr
    assert result.returncode == 1, out[-6000:]
    line = next(ln for ln in out.splitlines() if ln.startswith(f"| {key} "))
    assert "FAIL" in line and "0.02" in line, line
    assert f"failing: {key}" in out
    assert f"eval/{MODEL}/sft-lora" not in out  # only the named target was re-run and compared


def test_local_data_travels_with_the_bundle(tmp_path, monkeypatch):
    """A study's local dataset files are carried in the bundle; verify's re-run reads those copies
    in its own directory and the data step makes the same splits from them (the H100 verify of
    configs/gpu-e2e.yaml stopped at a local dataset before). Without copies (include_local_data:
    false), a missing or changed original is named before anything runs."""
    import copy
    import shutil

    from snaketune.bundle import carry_local_data, local_data, place_local_data
    from snaketune.data import prepare
    from snaketune.schema import resolve

    src = tmp_path / "src"
    for split, n in (("train", 12), ("test", 3)):
        (src / "data" / split).mkdir(parents=True)
        (src / "data" / split / "chat.jsonl").write_text("".join(
            json.dumps({"messages": [{"role": "user", "content": f"{split} {i}?"},
                                     {"role": "assistant", "content": str(i)}]}) + "\n" for i in range(n)))
    block = resolve("datasets", {"source": "local", "format": "messages", "path": "data/train/chat.jsonl",
                                 "test_path": "data/test/chat.jsonl"})
    config = {"datasets": {"chat": block, "arith": resolve("datasets", {"source": "synthetic"})}}
    monkeypatch.chdir(src)
    studied = prepare(block, src / "results/datasets/chat")["sha256"]
    local = local_data(config)
    assert set(local) == {"chat"} and set(local["chat"]["files"]) == {"train/chat.jsonl", "test/chat.jsonl"}
    top = tmp_path / "bundle"
    (top / "hashes").mkdir(parents=True)
    (top / "hashes/inputs.json").write_text(json.dumps({"local_data": local}))
    carry_local_data(local, top)
    shutil.rmtree(src / "data")  # verify on another machine: the originals are not there

    run_dir, rerun = tmp_path / "run", copy.deepcopy(config)
    run_dir.mkdir()
    assert place_local_data(top, rerun, run_dir) == []
    assert rerun["datasets"]["chat"]["path"] == "inputs/datasets/chat/train/chat.jsonl"
    monkeypatch.chdir(run_dir)  # Snakemake's --directory
    assert prepare(rerun["datasets"]["chat"], run_dir / "results/datasets/chat")["sha256"] == studied

    shutil.rmtree(top / "inputs")  # packed with include_local_data: false
    (run_dir := tmp_path / "run2").mkdir()
    (problem, _) = place_local_data(top, copy.deepcopy(config), run_dir)
    assert f"dataset chat: {src / 'data/train/chat.jsonl'} is not on this machine" in problem
    assert "include_local_data: false" in problem
    for split in ("train", "test"):
        (src / "data" / split).mkdir(parents=True)
        (src / "data" / split / "chat.jsonl").write_text("{}\n")
    problems = place_local_data(top, copy.deepcopy(config), run_dir)
    assert len(problems) == 2 and "is not the file the study read" in problems[0]


def test_a_local_model_is_found_from_another_directory(tmp_path, monkeypatch):
    """A model given by a relative local path is re-run from its original (absolute) place; where
    that is gone, from the bundle's copy of its folder if the bundle carries weights; else verify
    names it before anything runs."""
    import copy
    import shutil

    from snaketune.bundle import place_local_data

    src = tmp_path / "src"
    (src / "models/m").mkdir(parents=True)
    (src / "models/m/config.json").write_text("{}")
    monkeypatch.chdir(src)
    config = {"models": {"m": {"source": "local", "path": "models/m"}, "t": {"source": "tiny"}}, "datasets": {}}
    top = tmp_path / "bundle"
    (top / "hashes").mkdir(parents=True)
    (top / "hashes/inputs.json").write_text(json.dumps({"models": {
        "m": {"resolved_path": str(src / "models/m"), "files": {}}, "t": {"files": {}}}}))
    (run_dir := tmp_path / "run").mkdir()
    rerun = copy.deepcopy(config)
    assert place_local_data(top, rerun, run_dir) == [] and rerun["models"]["m"]["path"] == str(src / "models/m")
    assert rerun["models"]["t"] == {"source": "tiny"}

    shutil.rmtree(src / "models")
    (problem,) = place_local_data(top, copy.deepcopy(config), run_dir)
    assert f"model m: {src / 'models/m'} is not on this machine" in problem and "include_weights: true" in problem
    (top / "results/m/base/model").mkdir(parents=True)
    (top / "results/m/base/model/model.safetensors").write_bytes(b"weights")
    rerun = copy.deepcopy(config)
    assert place_local_data(top, rerun, run_dir) == [] and rerun["models"]["m"]["path"] == "inputs/models/m"
    assert (run_dir / "inputs/models/m/model.safetensors").read_bytes() == b"weights"


def test_pack_carries_a_local_dataset_and_says_so(tmp_path, monkeypatch):
    """The bundle step itself (pack) copies a local dataset's files under inputs/datasets/, lists
    them in MANIFEST.json and the README, and verify's placement finds them in the unpacked bundle."""
    from conftest import ROOT
    from snaketune.bundle import pack, place_local_data, unpack
    from snaketune.data import prepare
    from snaketune.schema import resolve

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data/chat.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"{i}?"}, {"role": "assistant", "content": str(i)}]}) + "\n" for i in range(8)))
    block = resolve("datasets", {"source": "local", "format": "messages", "path": "data/chat.jsonl", "test_size": 2})
    prepare(block, tmp_path / "results/datasets/chat")
    config = {"study": STUDY, "models": {}, "datasets": {"chat": block},
              "reproduce": {"include_weights": False, "include_local_data": True, "tolerance": {}},
              "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"}}
    pack(config, ROOT, tmp_path / "b.tar.gz", results=tmp_path / "results")
    top = unpack(tmp_path / "b.tar.gz", tmp_path / "unpacked")
    assert check_manifest(top) == [] and "inputs/datasets/chat/chat.jsonl" in (top / "MANIFEST.json").read_text()
    assert sha256_file(top / "inputs/datasets/chat/chat.jsonl") == sha256_file(tmp_path / "data/chat.jsonl")
    assert "`inputs/datasets/`" in (top / "README.md").read_text()
    (run_dir := tmp_path / "run").mkdir()
    assert place_local_data(top, config, run_dir) == [] and (run_dir / config["datasets"]["chat"]["path"]).is_file()
