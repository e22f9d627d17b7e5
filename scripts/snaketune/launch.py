"""Run a step on its GPUs: pick the devices, and start torchrun when there is more than one.

    python -m snaketune.launch --gpus N [--nodes M] -- python -m snaketune.train --base ... --out ...

Rules wrap every command that may use a GPU in this launcher, passing ``resources.gpu`` (and
``resources.nodes``). What it does depends on where it runs:

* **One workstation** (no Slurm job): it takes N free GPUs out of the ones this machine shows
  (``CUDA_VISIBLE_DEVICES`` if set, else ``/dev/nvidia<i>``), holding a lock file per GPU under
  ``$SNAKETUNE_GPU_LOCK_DIR`` (default ``/tmp/snaketune-gpu-locks``) for as long as the step runs, and
  sets ``CUDA_VISIBLE_DEVICES`` to them, so that two jobs never share a GPU. Snakemake's
  ``--resources gpu=K`` (profiles/local) keeps the number of GPU jobs in check; the locks decide
  which GPU each one gets, also across several Snakemake runs on the same machine. A step with
  ``--gpus 0`` gets ``CUDA_VISIBLE_DEVICES=""``, so it cannot take a GPU by accident.
* **A Slurm job**: Slurm already chose the GPUs (``CUDA_VISIBLE_DEVICES``); nothing is locked.
  With M > 1 nodes it starts one ``torchrun`` per node under ``srun``, with a static rendezvous
  taken from the job: the first host of ``SLURM_JOB_NODELIST`` is the master, ``SLURM_NODEID``
  the node rank, the port derived from ``SLURM_JOB_ID`` (or ``MASTER_PORT``).

With N GPUs on one node and N > 1 the command runs under ``torchrun --standalone
--nproc-per-node N``; with one GPU (or none) the command is executed as it is. The command after
``--`` must be ``python -m MODULE ...`` or ``python SCRIPT ...`` when torchrun is needed.

``--dry-run`` prints the command (and the environment it sets) instead of running it.
"""
from __future__ import annotations

import argparse
import errno
import fcntl
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_LOCK_DIR = "/tmp/snaketune-gpu-locks"
BASE_PORT = 29500
PORT_SPAN = 10000


# ---------------------------------------------------------------------------------------------
# Slurm host lists
# ---------------------------------------------------------------------------------------------

def _split_top_level(text: str) -> list[str]:
    """Split a Slurm host list on the commas that are not inside brackets."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in host list {text!r}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise ValueError(f"unbalanced '[' in host list {text!r}")
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _expand_range(spec: str) -> list[str]:
    out = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        if "-" in item:
            lo, hi = item.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()):
                raise ValueError(f"bad range {item!r} in host list")
            width = len(lo)
            if int(hi) < int(lo):
                raise ValueError(f"bad range {item!r} in host list")
            out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
        else:
            out.append(item)
    return out


def _expand_host(pattern: str) -> list[str]:
    m = re.search(r"\[([^\[\]]*)\]", pattern)
    if not m:
        return [pattern]
    head, tail = pattern[: m.start()], pattern[m.end():]
    return [h for v in _expand_range(m.group(1)) for h in _expand_host(head + v + tail)]


def expand_hostlist(nodelist: str) -> list[str]:
    """Expand a Slurm host list: ``gpu[01-02,05],login-a[1-2]-ib`` -> ``gpu01 gpu02 gpu05 ...``.

    The same as ``scontrol show hostnames`` for the forms Slurm prints (ranges with zero
    padding, several bracket groups, comma-separated lists).
    """
    hosts: list[str] = []
    for part in _split_top_level(nodelist):
        hosts.extend(_expand_host(part))
    return hosts


def job_hosts(env: dict, use_scontrol: bool = True) -> list[str]:
    """Hosts of the current Slurm job, in Slurm's order (first = master)."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
    if not nodelist:
        return []
    if use_scontrol and shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                                 capture_output=True, text=True, timeout=30).stdout.split()
            if out:
                return out
        except (subprocess.SubprocessError, OSError):
            pass
    return expand_hostlist(nodelist)


# ---------------------------------------------------------------------------------------------
# Command building (pure: everything comes from the arguments and `env`)
# ---------------------------------------------------------------------------------------------

def in_slurm_job(env: dict) -> bool:
    return bool(env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID"))


def master_port(env: dict) -> int:
    if env.get("MASTER_PORT"):
        return int(env["MASTER_PORT"])
    jobid = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or "0"
    digits = re.sub(r"\D", "", jobid) or "0"
    return BASE_PORT + int(digits) % PORT_SPAN


def _torchrun_target(cmd: list[str]) -> list[str]:
    """``python -m mod args`` -> ``-m mod args``; ``python script.py args`` -> ``script.py args``."""
    if not cmd:
        raise ValueError("no command given after --")
    exe = os.path.basename(cmd[0])
    if re.fullmatch(r"python(\d+(\.\d+)?)?", exe) or cmd[0] == sys.executable:
        rest = cmd[1:]
        if rest[:1] == ["-u"]:
            rest = rest[1:]
        if not rest:
            raise ValueError("torchrun needs `python -m MODULE ...` or `python SCRIPT ...`")
        if rest[0] == "-m":
            if len(rest) < 2:
                raise ValueError("`python -m` without a module")
            return ["-m", rest[1], *rest[2:]]
        if rest[0].startswith("-"):
            raise ValueError(f"cannot run {shlex.join(cmd)!r} under torchrun")
        return rest
    if cmd[0].endswith(".py"):
        return cmd
    raise ValueError(
        f"cannot run {shlex.join(cmd)!r} under torchrun: give `python -m MODULE ...` or `python SCRIPT.py ...`")


def torchrun_prefix(python: str = sys.executable) -> list[str]:
    return [python, "-m", "torch.distributed.run"]


def build_command(gpus: int, nodes: int, cmd: list[str], env: dict, *, python: str = sys.executable,
                  hosts: list[str] | None = None, per_node: bool = False) -> list[str]:
    """The command line to exec for a step with ``gpus`` GPUs per node on ``nodes`` nodes.

    ``per_node`` is True inside the ``srun`` that starts one launcher per node (multi-node case):
    then ``SLURM_NODEID`` is this node's rank.
    """
    if gpus < 0 or nodes < 1:
        raise ValueError("--gpus must be >= 0 and --nodes >= 1")
    if nodes == 1:
        if gpus <= 1:
            return list(cmd)
        return [*torchrun_prefix(python), "--standalone", f"--nproc-per-node={gpus}",
                *_torchrun_target(cmd)]

    # several nodes: only inside a Slurm allocation
    if not in_slurm_job(env):
        raise ValueError(f"--nodes {nodes} needs a Slurm job (no SLURM_JOB_ID in the environment)")
    if hosts is None:
        hosts = job_hosts(env)
    if len(hosts) < nodes:
        raise ValueError(
            f"--nodes {nodes} but the Slurm job has {len(hosts)} node(s): "
            f"{env.get('SLURM_JOB_NODELIST', '')!r}; ask for resources.nodes={nodes}")
    nproc = max(gpus, 1)
    if not per_node:
        # one launcher per node; each builds its torchrun from its own SLURM_NODEID
        launcher = [python, "-m", "snaketune.launch", f"--gpus={gpus}", f"--nodes={nodes}",
                    "--per-node", "--", *cmd]
        return ["srun", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1",
                "--kill-on-bad-exit=1", *launcher]
    node_rank = env.get("SLURM_NODEID")
    if node_rank is None:
        raise ValueError("--per-node outside srun: SLURM_NODEID is not set")
    return [*torchrun_prefix(python), f"--nnodes={nodes}", f"--nproc-per-node={nproc}",
            f"--node-rank={int(node_rank)}", f"--master-addr={hosts[0]}",
            f"--master-port={master_port(env)}", *_torchrun_target(cmd)]


# ---------------------------------------------------------------------------------------------
# GPUs of one workstation
# ---------------------------------------------------------------------------------------------

def visible_gpus(env: dict, dev: str = "/dev") -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES if set, else /dev/nvidia<i>."""
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        return [g.strip() for g in cvd.split(",") if g.strip() and g.strip() != "-1"]
    try:
        ids = sorted(int(m.group(1)) for name in os.listdir(dev)
                     if (m := re.fullmatch(r"nvidia(\d+)", name)))
    except OSError:
        ids = []
    return [str(i) for i in ids]


def _lock_name(gpu: str) -> str:
    return "gpu-" + re.sub(r"[^A-Za-z0-9_.-]", "_", gpu) + ".lock"


def acquire_gpus(n: int, pool: list[str], lock_dir: str, timeout: float = 3600.0,
                 poll: float = 1.0, log=None) -> tuple[list[str], list[int]]:
    """Lock ``n`` GPUs of ``pool``; returns (ids, fds). The locks last as long as the fds are open
    (in this process or in a child that inherits them), so they are released when the step ends."""
    if n > len(pool):
        raise RuntimeError(
            f"the step asks for {n} GPU(s) but this machine shows {len(pool)} ({','.join(pool) or 'none'});"
            " lower resources.gpu or the gpu count in --resources")
    d = Path(lock_dir)
    d.mkdir(parents=True, exist_ok=True)
    try:
        os.chmod(d, 0o1777)
    except OSError:
        pass
    deadline = time.monotonic() + timeout
    warned = False
    while True:
        got: list[tuple[str, int]] = []
        for gpu in pool:
            path = d / _lock_name(gpu)
            fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                continue
            got.append((gpu, fd))
            if len(got) == n:
                return [g for g, _ in got], [f for _, f in got]
        for _, fd in got:
            os.close(fd)
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {n} free GPU(s) among {','.join(pool)} after {timeout:.0f} s")
        if not warned and log:
            log(f"waiting for {n} free GPU(s) among {','.join(pool)} (locks in {lock_dir})")
            warned = True
        time.sleep(poll)


# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("usage: python -m snaketune.launch --gpus N [--nodes M] -- COMMAND ...", file=sys.stderr)
        return 2
    i = argv.index("--")
    own, cmd = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(prog="python -m snaketune.launch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=0, help="GPUs per node (resources.gpu)")
    ap.add_argument("--nodes", type=int, default=1, help="nodes (resources.nodes)")
    ap.add_argument("--per-node", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--lock-dir", default=os.environ.get("SNAKETUNE_GPU_LOCK_DIR", DEFAULT_LOCK_DIR))
    ap.add_argument("--wait", type=float, default=float(os.environ.get("SNAKETUNE_GPU_WAIT", 3600)),
                    help="seconds to wait for free GPUs on a workstation")
    ap.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    args = ap.parse_args(own)
    if not cmd:
        ap.error("no command after --")

    env = dict(os.environ)
    log = lambda msg: print(f"[snaketune.launch] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        if not in_slurm_job(env):
            if args.nodes > 1:
                raise ValueError(f"--nodes {args.nodes} needs a Slurm job")
            if args.gpus and not visible_gpus(env):
                # a machine without GPUs (a laptop, CI): the step runs on the CPU instead of failing;
                # in a Slurm job the GPUs are the job's, so this never applies there
                log(f"this machine shows no GPU: running on the CPU (the step asked for {args.gpus})")
                args.gpus = 0
            if args.gpus == 0:
                env["CUDA_VISIBLE_DEVICES"] = ""
            elif not args.dry_run:
                ids, fds = acquire_gpus(args.gpus, visible_gpus(env), args.lock_dir, args.wait, log=log)
                for fd in fds:
                    os.set_inheritable(fd, True)  # held by the step until it exits
                env["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
        final = build_command(args.gpus, args.nodes, cmd, env, per_node=args.per_node)
    except (ValueError, RuntimeError) as e:
        log(f"error: {e}")
        return 2

    where = f"Slurm job {env.get('SLURM_JOB_ID') or env.get('SLURM_JOBID')}" if in_slurm_job(env) else "local"
    log(f"{where}: gpus={args.gpus} nodes={args.nodes} "
        f"CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '<unset>')!s}: {shlex.join(final)}")
    if args.dry_run:
        print(shlex.join(final))
        return 0
    sys.stdout.flush()
    try:
        os.execvpe(final[0], final, env)
    except OSError as e:
        log(f"error: cannot run {final[0]}: {e}")
        return 127


if __name__ == "__main__":
    sys.exit(main())
