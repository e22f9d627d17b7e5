"""snaketune.launch: torchrun command lines from (fake) Slurm environments, and GPU locks on a
workstation. No GPU, no Slurm and no torch needed."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from snaketune import launch
from snaketune.launch import acquire_gpus, build_command, expand_hostlist, master_port, visible_gpus

ROOT = Path(__file__).resolve().parents[1]
PY = "/opt/py/bin/python"
TRAIN = ["python", "-m", "snaketune.train", "--base", "b", "--out", "o"]


@pytest.mark.parametrize("nodelist, hosts", [
    ("node1", ["node1"]),
    ("gpu[01-03]", ["gpu01", "gpu02", "gpu03"]),
    ("gpu[08-11,15]", ["gpu08", "gpu09", "gpu10", "gpu11", "gpu15"]),
    ("a[1-2],b7,c[009-010]", ["a1", "a2", "b7", "c009", "c010"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("h100-[3,5]-ib", ["h100-3-ib", "h100-5-ib"]),
    ("x[98-101]", ["x98", "x99", "x100", "x101"]),
])
def test_expand_hostlist(nodelist, hosts):
    assert expand_hostlist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["gpu[01-03", "gpu01]", "gpu[3-1]", "gpu[a-b]"])
def test_expand_hostlist_rejects_garbage(bad):
    with pytest.raises(ValueError):
        expand_hostlist(bad)


def test_single_gpu_runs_the_command_unchanged():
    assert build_command(0, 1, TRAIN, {}, python=PY) == TRAIN
    assert build_command(1, 1, TRAIN, {"SLURM_JOB_ID": "7"}, python=PY) == TRAIN


def test_several_gpus_on_one_node_use_torchrun_standalone():
    cmd = build_command(4, 1, TRAIN, {"SLURM_JOB_ID": "7"}, python=PY)
    assert cmd == [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
                   "-m", "snaketune.train", "--base", "b", "--out", "o"]
    # a script instead of a module
    cmd = build_command(2, 1, ["python3", "-u", "train.py", "--x", "1"], {}, python=PY)
    assert cmd[-3:] == ["train.py", "--x", "1"] and "--nproc-per-node=2" in cmd


SLURM_2x8 = {  # what sbatch --nodes=2 --ntasks=2 --gpus-per-node=8 sets, as seen in the batch step
    "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_NUM_NODES": "2",
    "SLURM_NODEID": "0", "SLURM_PROCID": "0",
}


def test_multi_node_outer_starts_one_launcher_per_node_under_srun():
    cmd = build_command(8, 2, TRAIN, SLURM_2x8, python=PY, hosts=["gpu07", "gpu08"])
    assert cmd[:5] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert cmd[5:] == [PY, "-m", "snaketune.launch", "--gpus=8", "--nodes=2", "--per-node", "--", *TRAIN]


@pytest.mark.parametrize("nodeid", ["0", "1"])
def test_multi_node_per_node_torchrun_rendezvous_from_slurm(nodeid):
    env = dict(SLURM_2x8, SLURM_NODEID=nodeid)
    cmd = build_command(8, 2, TRAIN, env, python=PY, hosts=expand_hostlist(env["SLURM_JOB_NODELIST"]),
                        per_node=True)
    assert cmd == [PY, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=8",
                   f"--node-rank={nodeid}", "--master-addr=gpu07", f"--master-port={29500 + 123456 % 10000}",
                   "-m", "snaketune.train", "--base", "b", "--out", "o"]


def test_multi_node_hosts_come_from_the_nodelist_without_scontrol(monkeypatch):
    monkeypatch.setattr(launch.shutil, "which", lambda name: None)
    env = dict(SLURM_2x8, SLURM_JOB_NODELIST="h100-[12,14]", SLURM_NODEID="1")
    cmd = build_command(4, 2, TRAIN, env, python=PY, per_node=True)
    assert "--master-addr=h100-12" in cmd and "--node-rank=1" in cmd


def test_master_port_is_per_job_or_from_env():
    assert master_port({"SLURM_JOB_ID": "42"}) == 29542
    assert master_port({"SLURM_JOB_ID": "1234567"}) == 29500 + 4567
    assert master_port({"SLURM_JOB_ID": "42", "MASTER_PORT": "40000"}) == 40000
    # array jobs: SLURM_JOB_ID is numeric, but be robust to "123_4"
    assert 29500 <= master_port({"SLURM_JOB_ID": "123_4"}) < 39500


def test_multi_node_errors_are_clear():
    with pytest.raises(ValueError, match="needs a Slurm job"):
        build_command(8, 2, TRAIN, {}, python=PY)
    with pytest.raises(ValueError, match="has 1 node"):
        build_command(8, 2, TRAIN, dict(SLURM_2x8, SLURM_JOB_NODELIST="gpu07"), python=PY, hosts=["gpu07"])
    with pytest.raises(ValueError, match="SLURM_NODEID"):
        env = {k: v for k, v in SLURM_2x8.items() if k != "SLURM_NODEID"}
        build_command(8, 2, TRAIN, env, python=PY, hosts=["a", "b"], per_node=True)
    with pytest.raises(ValueError, match="torchrun"):
        build_command(2, 1, ["bash", "-c", "x"], {}, python=PY)


def test_visible_gpus(tmp_path):
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-1a2b,GPU-3c4d"}) == ["GPU-1a2b", "GPU-3c4d"]
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm", "null"):
        (tmp_path / name).touch()
    assert visible_gpus({}, dev=str(tmp_path)) == ["0", "1"]


def test_gpu_locks_never_hand_out_a_gpu_twice(tmp_path):
    pool = ["0", "1", "2"]
    a, fa = acquire_gpus(2, pool, str(tmp_path))
    b, fb = acquire_gpus(1, pool, str(tmp_path))
    assert len(set(a) | set(b)) == 3
    with pytest.raises(RuntimeError, match="no 1 free GPU"):
        acquire_gpus(1, pool, str(tmp_path), timeout=0.2, poll=0.05)
    os.close(fb[0])  # the job holding b ended
    c, fc = acquire_gpus(1, pool, str(tmp_path), timeout=1)
    assert c == b
    with pytest.raises(RuntimeError, match="shows 3"):
        acquire_gpus(4, pool, str(tmp_path))
    for fd in fa + fc:
        os.close(fd)


def _launch(args, env, **kw):
    return subprocess.Popen([sys.executable, "-m", "snaketune.launch", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_cli_local_jobs_get_distinct_gpus_and_cpu_jobs_none(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(CUDA_VISIBLE_DEVICES="4,6", SNAKETUNE_GPU_LOCK_DIR=str(tmp_path / "locks"))
    show = [sys.executable, "-c", "import os, time; print(os.environ['CUDA_VISIBLE_DEVICES']); time.sleep(1.5)"]
    procs = [_launch(["--gpus", "1", "--", *show], env) for _ in range(2)]
    time.sleep(0.3)
    third = _launch(["--gpus", "1", "--wait", "5", "--", *show], env)  # waits for a free GPU
    cpu = _launch(["--gpus", "0", "--", *show], env)
    outs = [p.communicate(timeout=30)[0].strip() for p in procs]
    assert sorted(outs) == ["4", "6"]
    out, err = third.communicate(timeout=30)
    assert third.returncode == 0 and out.strip() in ("4", "6"), err
    assert cpu.communicate(timeout=30)[0].strip() == ""


def test_cli_dry_run_in_a_fake_slurm_job():
    env = dict(os.environ, **SLURM_2x8)
    out = subprocess.run([sys.executable, "-m", "snaketune.launch", "--gpus", "8", "--nodes", "2",
                          "--dry-run", "--", *TRAIN], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.startswith("srun --nodes=2 --ntasks=2 --ntasks-per-node=1")
    bad = subprocess.run([sys.executable, "-m", "snaketune.launch", "--gpus", "1", "--nodes", "2", "--", "true"],
                         env={k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "needs a Slurm job" in bad.stderr


def test_cli_passes_the_exit_code_through():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    r = subprocess.run([sys.executable, "-m", "snaketune.launch", "--gpus", "0", "--",
                        sys.executable, "-c", "raise SystemExit(75)"], env=env, capture_output=True)
    assert r.returncode == 75
