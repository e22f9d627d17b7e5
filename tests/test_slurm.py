"""The Slurm profiles, against a real single-node Slurm cluster on localhost (ci/slurm/cluster.sh).

Two kinds of tests:

* unmarked ones check the profiles themselves (no cluster needed): the CI profile differs from the
  production one only where it must, and the plugin's partition selection sends CPU rules to the
  CPU partition and GPU rules to the H100 partition;
* ``@pytest.mark.slurm`` ones start the cluster (installing Debian's packages if needed), run
  workflows through ``snakemake --profile profiles/slurm-ci`` and stop the cluster again if they
  started it. They need root on Debian; elsewhere they are skipped. ``SNAKETUNE_SLURM=1`` turns
  that skip into a failure (CI), ``SNAKETUNE_SLURM=0`` skips them.

Run only these:  ``pytest -m slurm tests/test_slurm.py``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import Background, in_background, init_tracking, small_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "ci" / "slurm" / "cluster.sh"
PROFILE_SLURM = ROOT / "profiles" / "slurm"
PROFILE_CI = ROOT / "profiles" / "slurm-ci"
PROFILE_LOCAL = ROOT / "profiles" / "local"
BIN = Path(sys.executable).parent
SNAKEMAKE = BIN / "snakemake"
WANT = os.environ.get("SNAKETUNE_SLURM", "")  # "1": must run, "0": skip, "": run if possible
CPU_PARTITION, GPU_PARTITION = "cpu", "gpu-h100"   # ci/slurm/cluster.sh and profiles/slurm/partitions.yaml


# ------------------------------------------------------------------------------------------------
# The profiles (no cluster needed)
# ------------------------------------------------------------------------------------------------

# keys in which profiles/slurm-ci may differ from profiles/slurm, and why
CI_ONLY = {
    "jobs": "2 real cores",
    "retries": "a failing job fails at once",
    "latency-wait": "local disk",
    "slurm-no-account": "no accounting, no accounts",
    "slurm-status-command": "no slurmdbd, so no sacct",
    "slurm-init-seconds-before-status-checks": "poll early",
    "slurm-keep-successful-logs": "the tests read the logs",
    "slurm-partition-config": "relative path to the same file",
}


def _profile(path: Path) -> dict:
    return yaml.safe_load((path / "config.yaml").read_text())


def test_ci_profile_is_the_production_profile_but_for_ci_keys():
    prod, ci = _profile(PROFILE_SLURM), _profile(PROFILE_CI)
    for key in set(prod) | set(ci):
        if key in CI_ONLY:
            continue
        assert prod.get(key) == ci.get(key), f"profiles/slurm-ci differs from profiles/slurm in {key!r}"
    # both use the same site file of partitions
    assert (PROFILE_CI / ci["slurm-partition-config"]).resolve() == \
        (PROFILE_SLURM / prod["slurm-partition-config"]).resolve()
    assert prod["executor"] == "slurm" and prod["slurm-requeue"] is True


def _fake_job(name, threads=1, **resources):
    res = {"gpu": 0, "mem_mb": 4000, "runtime": 60, "cpus_per_gpu": 8, **resources}
    return SimpleNamespace(name=name, threads=threads, resources=SimpleNamespace(
        get=lambda k, default=None: res.get(k, default), **res))


def test_partition_selection_sends_gpu_rules_to_the_h100_partition():
    from snakemake_executor_plugin_slurm.partitions import get_best_partition, read_partition_file
    parts = read_partition_file(PROFILE_SLURM / "partitions.yaml")
    names = {p.name for p in parts}
    assert names == {CPU_PARTITION, GPU_PARTITION}, "tests and ci/slurm/cluster.sh assume these names"
    log = SimpleNamespace(info=lambda *a, **k: None, warning=lambda *a, **k: None, debug=lambda *a, **k: None)
    pick = lambda job: get_best_partition(parts, job, log)  # noqa: E731
    assert pick(_fake_job("prepare_data")) == CPU_PARTITION
    assert pick(_fake_job("summary", threads=4, mem_mb=64000, runtime=2800)) == CPU_PARTITION
    assert pick(_fake_job("train", gpu=1)) == GPU_PARTITION
    assert pick(_fake_job("train", gpu=8, gpu_model="h100")) == GPU_PARTITION
    assert pick(_fake_job("train", gres="gpu:h100:4")) == GPU_PARTITION
    assert pick(_fake_job("train", gpu=1, gpu_model="a100")) is None   # no such GPUs here
    assert pick(_fake_job("train", gpu=16)) is None                      # more than a node has


def test_sbatch_flags_for_a_gpu_rule():
    """What the plugin puts on the sbatch line for the resource names the rules use."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string
    job = _fake_job("train", threads=1, gpu=2, mem_mb=32000, runtime=600)
    params = dict(run_uuid="u", slurm_logfile="l", comment_str="rule_train", account="", partition=" -p gpu-h100",
                  workdir="/w")
    settings = SimpleNamespace(requeue=True, no_requeue=False, qos=None, reservation=None)
    call = get_submit_command(job, params, settings=settings) + set_gres_string(job)
    for flag in ("-p gpu-h100", "--mem 32000", "-t 600", "--requeue", "--cpus-per-gpu=8", "--gpus=2"):
        assert flag in call, (flag, call)
    cpu = _fake_job("summary", threads=2)
    call = get_submit_command(cpu, params, settings=settings) + set_gres_string(cpu)
    assert "--cpus-per-task=2" in call and "--gpus" not in call and "--cpus-per-gpu" not in call


def test_local_profile_counts_gpus(monkeypatch, tmp_path):
    from snakemake.profiles import ProfileConfigFileParser
    def parse(**env):
        for k in ("SNAKETUNE_GPUS", "CUDA_VISIBLE_DEVICES"):
            monkeypatch.delenv(k, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        with open(PROFILE_LOCAL / "config.yaml") as f:
            return ProfileConfigFileParser().parse(f)
    assert parse(CUDA_VISIBLE_DEVICES="0,3")["resources"] == ["gpu=2"]
    assert parse(CUDA_VISIBLE_DEVICES="")["resources"] == ["gpu=0"]
    assert parse(SNAKETUNE_GPUS="4", CUDA_VISIBLE_DEVICES="0")["resources"] == ["gpu=4"]


# ------------------------------------------------------------------------------------------------
# The live cluster
# ------------------------------------------------------------------------------------------------

def _why_no_cluster() -> str | None:
    if WANT == "0":
        return "SNAKETUNE_SLURM=0"
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return "needs root on Linux (ci/slurm/cluster.sh starts slurmctld/slurmd/munged)"
    if not (shutil.which("slurmctld") or shutil.which("apt-get")):
        return "no Slurm and no apt-get to install it"
    return None


def _sh(*cmd, check=True, timeout=120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, timeout=timeout, capture_output=True, text=True, **kw)


class Cluster:
    """The test cluster, brought up once per session by whatever needs it first (a test, or the
    background run of the default study) and stopped when the session ends if it started it."""

    _lock = threading.Lock()
    state: SimpleNamespace | None = None

    @classmethod
    def up(cls) -> SimpleNamespace:
        with cls._lock:
            if cls.state is None:
                cls.state = cls._start()
            return cls.state

    @staticmethod
    def _start() -> SimpleNamespace:
        why = _why_no_cluster()
        if why:
            return SimpleNamespace(ok=False, why=why)
        was_running = _sh(str(CLUSTER), "status", check=False).returncode == 0
        t0 = time.monotonic()
        up = _sh(str(CLUSTER), "up", check=False, timeout=900)
        if up.returncode != 0:
            return SimpleNamespace(ok=False, why=f"ci/slurm/cluster.sh up failed:\n{up.stdout}\n{up.stderr}")
        startup = time.monotonic() - t0
        print(f"\n[slurm] cluster up in {startup:.1f} s (was running: {was_running})", file=sys.stderr)
        return SimpleNamespace(ok=True, startup_s=startup, was_running=was_running)

    @classmethod
    def stop(cls) -> None:
        with cls._lock:
            if cls.state is not None and cls.state.ok and not cls.state.was_running:
                _sh(str(CLUSTER), "stop", check=False, timeout=300)
            cls.state = None


@pytest.fixture(scope="session")
def slurm_cluster():
    state = Cluster.up()
    if not state.ok:
        if WANT == "1":
            pytest.fail(f"SNAKETUNE_SLURM=1 but the Slurm cluster cannot be started: {state.why}")
        pytest.skip(state.why)
    try:
        yield state
    finally:
        Cluster.stop()


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env["PATH"] = f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}"
    for k in ("CUDA_VISIBLE_DEVICES", "SNAKETUNE_TRACKING", "MLFLOW_TRACKING_URI"):
        env.pop(k, None)
    return env


def run_snakemake(workdir: Path, *args, timeout: int = 900, name: str = "snakemake") -> subprocess.CompletedProcess:
    """snakemake in workdir, under `timeout -s INT` (the plugin's hangs ignore SIGTERM)."""
    cmd = ["timeout", "-s", "INT", "-k", "30", str(timeout), str(SNAKEMAKE), *args]
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=workdir, env=_env(), capture_output=True, text=True)
    p.wall_s = time.monotonic() - t0
    (workdir / f"{name}.out").write_text(p.stdout + p.stderr)
    print(f"[slurm] {name}: rc={p.returncode} in {p.wall_s:.1f} s", file=sys.stderr)
    return p


def slurm_jobs(output: str) -> list[dict]:
    """The Slurm jobs of one snakemake run (found by its run id), with partition and GPU request."""
    m = re.search(r"SLURM run ID: (\S+)", output)
    assert m, "no 'SLURM run ID' in snakemake's output"
    lines = _sh("squeue", "--states=all", "--noheader", "--name", m.group(1), "--format=%i|%k|%P|%T").stdout
    jobs = []
    for line in lines.splitlines():
        jobid, comment, partition, state = line.strip().split("|")
        detail = _sh("scontrol", "show", "job", "--oneliner", jobid, check=False).stdout
        field = lambda key: (re.search(rf"\b{key}=(\S*)", detail) or [None, ""])[1]  # noqa: E731
        jobs.append(dict(id=jobid, rule=re.sub(r"^rule_|_wildcards_.*$", "", comment), comment=comment,
                         partition=partition, state=state, tres_per_job=field("TresPerJob"),
                         tres_per_node=field("TresPerNode"), restarts=int(field("Restarts") or 0)))
    return jobs


def rule_gpus(output: str) -> dict:
    """rule name -> gpu resource, from the job descriptions snakemake prints."""
    out = {}
    for m in re.finditer(r"^(?:local)?rule (\w+):\n(?:    .*\n)*?    resources: (.*)$", output, re.M):
        g = re.search(r"\bgpu=(\d+)", m.group(2))
        out[m.group(1)] = int(g.group(1)) if g else 0
    return out


def assert_jobs_went_through_slurm(p: subprocess.CompletedProcess, jobs: list[dict] | None = None) -> list[dict]:
    """``jobs``: slurm_jobs() taken when the run ended (squeue forgets finished jobs after MinJobAge)."""
    output = p.stdout + p.stderr
    jobs = slurm_jobs(output) if jobs is None else jobs
    gpus = rule_gpus(output)
    local_rules = set(re.findall(r"^localrule (\w+):", output, re.M))
    submitted = len(re.findall(r"has been submitted with SLURM jobid", output))
    assert submitted == len(jobs) > 0
    assert {j["rule"] for j in jobs} == set(gpus) - local_rules, "every rule must become a Slurm job"
    for j in jobs:
        assert j["state"] == "COMPLETED", j
        if gpus[j["rule"]] > 0:
            assert j["partition"] == GPU_PARTITION, j
            assert "gpu" in j["tres_per_job"] + j["tres_per_node"], j
        else:
            assert j["partition"] == CPU_PARTITION, j
            assert "gpu" not in j["tres_per_job"] + j["tres_per_node"], j
    return jobs


# A small workflow of the same shape as snaketune's (CPU step -> GPU training -> GPU eval), with a
# training script that checkpoints every second and resumes, to drill preemption quickly.
TOY_SNAKEFILE = textwrap.dedent('''
    rule all:
        input: "results/eval.json"

    rule prep:
        output: "results/prep.txt"
        threads: 1
        resources: mem_mb=500, runtime=5
        shell: "hostname > {output}"

    rule train:
        input: "results/prep.txt"
        output: "results/train.json"
        params: checkpoints="results/train.checkpoints"
        log: "results/train.log"
        resources: gpu=1, mem_mb=1000, runtime=10
        shell: "python -m snaketune.launch --gpus {resources.gpu} -- python toy_train.py {config[steps]} {params.checkpoints} {output} >> {log} 2>&1"

    rule evaluate:
        input: "results/train.json"
        output: "results/eval.json"
        resources: gpu=1, mem_mb=1000, runtime=5
        shell: "cp {input} {output}"

    rule boom:
        output: "results/boom.txt"
        resources: mem_mb=500, runtime=5
        shell: "echo failing on purpose >&2; exit 3"
''')

TOY_TRAIN = textwrap.dedent('''
    import json, os, signal, sys, time
    from pathlib import Path
    steps, ck, out = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    ck.mkdir(parents=True, exist_ok=True)
    start = int((ck / "step").read_text()) if (ck / "step").exists() else 0
    def event(msg):  # the checkpoint folder outlives the job's log, which Snakemake recreates
        print(msg, flush=True)
        with open(ck / "events", "a") as f:
            f.write(msg + "\\n")
    event(f"start at step {start} in Slurm job {os.environ.get('SLURM_JOB_ID')}")
    stop = []
    signal.signal(signal.SIGTERM, lambda s, f: stop.append(s))
    for i in range(start, steps):
        if stop:
            event(f"SIGTERM: checkpoint at step {i}, exit 75")
            sys.exit(75)
        time.sleep(1)
        (ck / "step.tmp").write_text(str(i + 1))
        os.replace(ck / "step.tmp", ck / "step")
    out.write_text(json.dumps({"steps": steps, "resumed_from": start,
                               "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}))
''')


@pytest.fixture
def toy(tmp_path):
    SMALL_RUN.join_if_started()  # one stand-in GPU, two cores: let the small study's run finish
    (tmp_path / "Snakefile").write_text(TOY_SNAKEFILE)
    (tmp_path / "toy_train.py").write_text(TOY_TRAIN)
    return tmp_path


@pytest.mark.slurm
def test_cluster_has_cpu_and_stand_in_h100_partitions(slurm_cluster):
    out = _sh("sinfo", "--noheader", "--format=%R|%G|%T").stdout.split()
    parts = {line.split("|")[0]: line.split("|")[1:] for line in out}
    assert set(parts) == {CPU_PARTITION, GPU_PARTITION}
    assert parts[GPU_PARTITION][0].startswith("gpu:h100:")
    assert _sh("scontrol", "show", "config").stdout.count("accounting_storage/none") == 1


@pytest.mark.slurm
def test_preemption_drill_requeued_training_resumes_from_its_checkpoint(slurm_cluster, toy):
    """A running training job is requeued (as on preemption); Slurm runs it again, it resumes from
    its checkpoint, and the workflow finishes without Snakemake noticing more than a delay."""
    steps = 15
    cmd = ["timeout", "-s", "INT", "-k", "30", "600", str(SNAKEMAKE), "--profile", str(PROFILE_CI),
           "--config", f"steps={steps}"]
    proc = subprocess.Popen(cmd, cwd=toy, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        jobid, deadline = None, time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            running = _sh("squeue", "--noheader", "--states=RUNNING", "--format=%i|%k").stdout.split()
            ids = [line.split("|")[0] for line in running if line.split("|")[1] == "rule_train"]
            step_file = toy / "results/train.checkpoints/step"
            if ids and step_file.exists() and int(step_file.read_text() or 0) >= 3:
                jobid = ids[0]
                break
            time.sleep(0.5)
        assert jobid, "the training job never ran for 3 steps"
        _sh("scontrol", "requeue", jobid)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.send_signal(2)
            proc.wait(60)
    (toy / "snakemake.out").write_text(out)
    assert proc.returncode == 0, out[-3000:]
    result = json.loads((toy / "results/train.json").read_text())
    assert result["steps"] == steps and result["resumed_from"] >= 3, result
    assert result["cuda_visible_devices"] == "0"        # chosen by Slurm (gres), not by us
    events = (toy / "results/train.checkpoints/events").read_text().splitlines()
    assert events[0] == f"start at step 0 in Slurm job {jobid}", events
    assert events[1].startswith("SIGTERM: checkpoint at step"), events
    assert events[2] == f"start at step {result['resumed_from']} in Slurm job {jobid}", events
    jobs = {j["rule"]: j for j in slurm_jobs(out)}
    assert jobs["train"]["id"] == jobid and jobs["train"]["restarts"] == 1
    assert_jobs_went_through_slurm(SimpleNamespace(stdout=out, stderr=""))


@pytest.mark.slurm
def test_failing_job_makes_snakemake_fail_without_hanging(slurm_cluster, toy):
    p = run_snakemake(toy, "--profile", str(PROFILE_CI), "results/boom.txt", timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode not in (0, 124, 137), f"rc={p.returncode}\n{out[-3000:]}"
    assert p.wall_s < 240
    jobs = slurm_jobs(out)
    assert [(j["rule"], j["state"]) for j in jobs] == [("boom", "FAILED")]
    assert re.search(r"Error in rule boom", out)


# ------------------------------------------------------------------------------------------------
# snaketune's own workflow through Slurm
# ------------------------------------------------------------------------------------------------

SNAKEFILE = ROOT / "workflow" / "Snakefile"


def slurm_config(local_config: dict, dest: Path) -> Path:
    """The local study's config, with its GPU steps declaring one GPU (resources.gpu.gpu = 1), so
    that they go to the stand-in H100 partition. The steps still run on the CPU (no CUDA here), so
    the results must not change."""
    c = json.loads(json.dumps(local_config))
    c.setdefault("resources", {}).setdefault("gpu", {})["gpu"] = 1
    (dest / "config.yaml").write_text(yaml.safe_dump(c, sort_keys=False))
    return dest / "config.yaml"


TIMING = re.compile(r"seconds|time|per_s|duration|model_sha256|source_model")


def eval_results(workdir: Path) -> dict:
    """Every evaluation JSON, without timings and without model_sha256 (it hashes the model
    folder's metadata too, timings included); the weights are compared by weights() instead."""
    out = {}
    for f in sorted((workdir / "results").glob("**/eval/*.json")):
        data = json.loads(f.read_text())
        out[str(f.relative_to(workdir))] = {k: v for k, v in data.items() if not TIMING.search(k)}
    return out


def weights(workdir: Path) -> dict:
    """sha256 of every weights file of every model/adapter folder (checkpoints left out)."""
    import hashlib
    out = {}
    for f in sorted((workdir / "results").glob("**/*.safetensors")):
        rel = f.relative_to(workdir)
        if "checkpoints" not in rel.parts:
            out[str(rel)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def mlflow_runs(workdir: Path) -> dict:
    """snakemake.job tag -> sorted [status, metrics] of its MLflow runs (timings left out)."""
    db = workdir / "results" / "mlflow.db"
    assert db.exists(), f"no MLflow database in {workdir}"
    code = textwrap.dedent(f'''
        import json, re, mlflow
        mlflow.set_tracking_uri("sqlite:///{db}")
        out = {{}}
        for r in mlflow.search_runs(search_all_experiments=True, output_format="list"):
            metrics = {{k: v for k, v in r.data.metrics.items()
                        if not re.search(r"runtime|per_second|per_s|seconds|time|flos|duration|_s$|_ms$|ttft|tpot|latency", k)}}
            out.setdefault(r.data.tags.get("snakemake.job", r.info.run_name), []).append([r.info.status, metrics])
        print(json.dumps({{k: sorted(v, key=json.dumps) for k, v in out.items()}}))
    ''')
    return json.loads(_sh(sys.executable, "-c", code, timeout=300).stdout.strip().splitlines()[-1])


def _checkpoint_steps(folder: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in folder.glob("checkpoint-*/trainer_state.json"))


def run_with_preemption_drill(workdir: Path, args: list[str], timeout: int = 3000):
    """Run snakemake; once the last training job has a checkpoint (and is still running),
    `scontrol requeue` it, as a preemption would. Returns (process result, drilled job or None).
    The timeout only catches a hung plugin: the run shares 2 cores with the rest of the suite (a CI
    run on 2026-12-04 was at its last job, the summary, when 1800 s ran out)."""
    cmd = in_background(["timeout", "-s", "INT", "-k", "30", str(timeout), str(SNAKEMAKE), *args])
    log = open(workdir / "slurm.out", "w+")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=workdir, env=_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
    drilled = None
    try:
        while proc.poll() is None and drilled is None:
            time.sleep(0.3)
            running = _sh("squeue", "--noheader", "--states=RUNNING", "--format=%i|%k").stdout.split()
            for line in running:
                jobid, comment = line.split("|")
                m = re.match(r"rule_train_adapter_wildcards_(.+)$", comment)
                if not m:
                    continue
                for ck in (workdir / "results").glob("*/*/checkpoints"):
                    model, recipe = ck.parts[-3], ck.parts[-2]
                    steps = _checkpoint_steps(ck)
                    if m.group(1) == f"{model}_{recipe}" and steps:
                        _sh("scontrol", "requeue", jobid)
                        drilled = dict(id=jobid, model=model, recipe=recipe, at_checkpoint=steps[-1])
                        print(f"[slurm] requeued {comment} (job {jobid}) at checkpoint {steps[-1]}",
                              file=sys.stderr)
                        break
        proc.wait(timeout=timeout + 60)
    finally:
        if proc.poll() is None:
            proc.send_signal(2)
            proc.wait(60)
    log.seek(0)
    p = SimpleNamespace(returncode=proc.returncode, stdout=log.read(), stderr="", wall_s=time.monotonic() - t0)
    log.close()
    print(f"[slurm] slurm: rc={p.returncode} in {p.wall_s:.1f} s", file=sys.stderr)
    return p, drilled


def run_small_study_through_slurm() -> SimpleNamespace | None:
    """The small study (``conftest.small_config``) through profiles/slurm-ci, with the preemption
    drill, run in the background from collection on (``background_start``): it waits on Slurm's
    polling most of the time, so the other tests run meanwhile. None when there is no cluster (the
    slurm_cluster fixture then skips or fails with the reason)."""
    if not Cluster.up().ok:
        return None
    work = Path(tempfile.mkdtemp(prefix="snaketune-slurm-"))
    slurm_config(small_config(), work)
    init_tracking(work)  # as the local studies: two first jobs would race on the schema
    p, drilled = run_with_preemption_drill(work, ["-s", str(SNAKEFILE), "--profile", str(PROFILE_CI)])
    jobs = slurm_jobs(p.stdout) if p.returncode == 0 else None  # now, while squeue still lists them
    return SimpleNamespace(work=work, p=p, drilled=drilled, jobs=jobs)


SMALL_RUN = Background("slurm-small-run", run_small_study_through_slurm)


def background_start(wanted: set[str]) -> None:
    """Called by conftest.py once the tests are collected, with every fixture they use."""
    if "slurm_small_run" in wanted:
        SMALL_RUN.start()


@pytest.fixture(scope="session")
def slurm_small_run(slurm_cluster) -> SimpleNamespace:
    return SMALL_RUN.wait()


@pytest.mark.slurm
@pytest.mark.skipif(not SNAKEFILE.exists(), reason="workflow/Snakefile not written yet")
def test_workflow_through_slurm_equals_a_local_run(slurm_small_run, small_study):
    """The small study through profiles/slurm-ci, with its adapter training requeued in the middle:
    every rule is a Slurm job (GPU rules in the H100 partition, with a GPU request), the training
    resumes from its checkpoint, and models, evaluations and MLflow runs equal those of the local
    run of the same study (the shared `small_study` fixture, which ran on to `bundle`)."""
    local = small_study
    slurm, p_slurm, drilled = slurm_small_run.work, slurm_small_run.p, slurm_small_run.drilled
    assert p_slurm.returncode == 0, p_slurm.stdout[-4000:]
    print(f"[slurm] small study via Slurm: {p_slurm.wall_s:.0f} s", file=sys.stderr)

    jobs = assert_jobs_went_through_slurm(p_slurm, slurm_small_run.jobs)
    assert any(j["partition"] == GPU_PARTITION for j in jobs), "no GPU-declared rule in the workflow?"

    # the preemption drill: same Slurm job ran twice, the second time from the checkpoint
    assert drilled, "the adapter training finished before it could be requeued"
    job = next(j for j in jobs if j["id"] == drilled["id"])
    assert job["rule"] == "train_adapter" and job["restarts"] == 1, job
    train_log = (slurm / "results" / "logs" / drilled["model"] / drilled["recipe"] / "train.log").read_text()
    assert re.search(r"resuming from \S*checkpoint-\d+", train_log), train_log[-2000:]

    assert weights(local) and weights(local) == weights(slurm)
    assert eval_results(local) and eval_results(local) == eval_results(slurm)
    r_local = {job: runs for job, runs in mlflow_runs(local).items() if not job.startswith("bundle[")}
    assert_same_mlflow_runs(r_local, mlflow_runs(slurm), drilled_prefix="train_adapter[")


def assert_same_mlflow_runs(r_local: dict, r_slurm: dict, drilled_prefix: str) -> None:
    """Same MLflow runs with the same metrics, but for what a requeue changes: the interrupted
    training left one more run (not FINISHED), and Trainer's `train_loss` of the resumed run
    averages only the steps run after the resume (the last logged `loss` and the weights agree)."""
    r_local, r_slurm = json.loads(json.dumps(r_local)), json.loads(json.dumps(r_slurm))
    for key, runs in r_slurm.items():
        finished = [r for r in runs if r[0] == "FINISHED"]
        if len(finished) < len(runs):
            assert key.startswith(drilled_prefix), (key, runs)
            assert len(finished) == 1, (key, runs)
            r_slurm[key] = finished
            for r in r_slurm[key] + r_local.get(key, []):
                r[1].pop("train_loss", None)
    assert r_local and r_local == r_slurm
