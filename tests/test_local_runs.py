"""Running the workflow as a user does on one machine: the interpreter the rules use, CPU-only
machines, datasets without a test split, and the optimizer keys ms-swift users set."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import ROOT

VENV_BIN = Path(sys.executable).parent


def _config(**resources):
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config.pop("resources")
    config.update(resources)
    return config


def _snakemake(tmp_path, config, *args, env=None):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    return subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "workflow/Snakefile"),
                           "--configfile", str(tmp_path / "config.yaml"), "--directory", str(tmp_path), *args],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)


def _plain_env(**extra):
    """A shell whose PATH has no venv (the venv not activated), without tracking variables."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "SNAKETUNE_TRACKING", "CUDA_VISIBLE_DEVICES", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if Path(p) != VENV_BIN)
    env.update(extra)
    return env


def test_rules_run_the_interpreter_snakemake_runs_under(tmp_path):
    """`.venv/bin/snakemake` without an activated venv: the rules' `python` must still be the
    venv's (a bare `python` was the system one: `No module named 'snaketune'`)."""
    result = _snakemake(tmp_path, _config(), "--cores", "1", "results/datasets/arith", env=_plain_env())
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert (tmp_path / "results/datasets/arith/train.jsonl").is_file()


def test_cpu_only_machine_runs_gpu_steps_on_the_cpu():
    """A config with no resources block asks for a GPU per GPU step; on a machine without GPUs the
    launcher runs the step on the CPU (and says so) instead of failing it. In a Slurm job the GPUs
    are the job's and nothing changes (test_launch)."""
    cmd = [sys.executable, "-m", "snaketune.launch", "--gpus", "1", "--", sys.executable, "-c",
           "import os; print('visible=' + repr(os.environ['CUDA_VISIBLE_DEVICES']))"]
    env = {k: v for k, v in _plain_env(CUDA_VISIBLE_DEVICES="").items() if not k.startswith("SLURM_")}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert "visible=''" in result.stdout
    assert "this machine shows no GPU: running on the CPU" in result.stderr


def test_test_size_zero_trains_on_every_row(tmp_path):
    from snaketune.data import build

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join('{"messages": [{"role": "user", "content": "q%d"}, {"role": "assistant", "content": "a"}]}\n'
                            % i for i in range(7)))
    splits, _ = build({"source": "local", "path": str(rows), "format": "messages", "test_size": 0})
    assert len(splits["train"]) == 7 and splits["test"] == []


def test_test_size_zero_is_valid_but_cannot_be_benched(tmp_path):
    """test_size 0 passes the schema; a bench on that dataset's (empty) test split stops the run
    before any job, naming the bench and the fix."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n')
    config = _config(resources={"gpu": {"gpu": 0}})
    config["datasets"]["mine"] = {"source": "local", "path": str(rows), "test_size": 0}
    config["recipes"]["sft-lora"]["dataset"] = "mine"
    ok = _snakemake(tmp_path, config, "-n")
    assert ok.returncode == 0, (ok.stdout + ok.stderr)[-3000:]
    config["benches"]["mine"] = {"dataset": "mine"}
    config["evaluation"]["benches"].append("mine")
    bad = _snakemake(tmp_path, config, "-n")
    out = bad.stdout + bad.stderr
    assert bad.returncode != 0 and "benches.mine: dataset 'mine' has test_size 0 and no test_path" in out


def test_optimizer_keys_reach_the_trainer(tmp_path):
    from transformers import TrainingArguments

    from snaketune.schema import resolve
    from snaketune.training import trainer_args

    recipe = resolve("recipes", {"learning_rate": 1e-4, "optim": "adamw_torch_fused", "adam_beta1": 0.8,
                                 "adam_beta2": 0.95, "adam_epsilon": 1e-6})
    args = TrainingArguments(**trainer_args(recipe, tmp_path, False, "fp32", 10))
    assert (args.optim.value, args.adam_beta1, args.adam_beta2, args.adam_epsilon) == ("adamw_torch_fused", 0.8, 0.95, 1e-6)
    default = TrainingArguments(**trainer_args(resolve("recipes", {"learning_rate": 1e-4}), tmp_path, False, "fp32", 10))
    assert (default.optim.value, default.adam_beta2) == ("adamw_torch", 0.999)


def test_optimizer_keys_train(tiny_model, tiny_data, tmp_path):
    """The fused AdamW kernel with ms-swift's beta2 trains on CPU and is used (its state has no
    foreach-only keys; the loss falls)."""
    from snaketune.tracking import MemoryRun
    from snaketune.train import train

    recipe = {"stage": "sft", "train_type": "full", "learning_rate": 3e-3, "batch_size": 8, "max_steps": 30,
              "logging_steps": 5, "save_steps": 1000, "optim": "adamw_torch_fused", "adam_beta2": 0.95, "seed": 0}
    summary = train(str(tiny_model), [str(tiny_data)], recipe, str(tmp_path / "out"), str(tmp_path / "ckpt"), MemoryRun())
    assert summary["final_loss"] < summary["first_loss"]


def test_expected_bitsandbytes_cpu_kernel_warning_is_silenced(caplog):
    """bitsandbytes warns on every import on AVX512-BF16 CPUs that it cannot fetch a hub kernel
    (no `kernels` package, no hub): expected, so snaketune drops that one message."""
    import snaketune  # noqa: F401  (installs the filter)

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure", "x")
        logger.warning("another bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["another bitsandbytes warning"]


def test_editing_a_local_dataset_file_reruns_its_data_step(tmp_path):
    """A local dataset file (relative to the study folder) is an input of the data rule: after rows
    are appended, Snakemake reruns prepare_data instead of training on the old rows."""
    row = '{"messages": [{"role": "user", "content": "q%d"}, {"role": "assistant", "content": "a"}]}\n'
    (tmp_path / "mine.jsonl").write_text("".join(row % i for i in range(20)))
    config = _config(resources={"gpu": {"gpu": 0}})
    config["datasets"]["mine"] = {"source": "local", "path": "mine.jsonl"}
    first = _snakemake(tmp_path, config, "--cores", "1", "results/datasets/mine", env=_plain_env())
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    idle = _snakemake(tmp_path, config, "-n", "results/datasets/mine", env=_plain_env())
    assert "Nothing to be done" in idle.stdout + idle.stderr
    with open(tmp_path / "mine.jsonl", "a") as fh:
        fh.write(row % 99)
    again = _snakemake(tmp_path, config, "-n", "results/datasets/mine", env=_plain_env())
    out = again.stdout + again.stderr
    assert "rule prepare_data" in out and "mine.jsonl" in out, out[-3000:]
