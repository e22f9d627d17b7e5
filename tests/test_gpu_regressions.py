"""Bugs found while preparing the GPU end-to-end study (configs/gpu-e2e.yaml, issue 13), pinned on CPU."""

import json
import subprocess
import sys

import yaml

from conftest import ROOT


def _dry_run(workdir, *args):
    return subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "workflow/Snakefile"), "-n",
                           *args], capture_output=True, text=True, timeout=300, cwd=workdir)


def test_configfile_replaces_the_default_study(tmp_path):
    """`snakemake --configfile configs/X.yaml` in the repository root (README's command) merged X into
    config.yaml: the demo's model, its recipes (`from: pt` into a recipe of the same name) and its
    `resources.gpu: {gpu: 0}` joined the study, so the 7B alpaca example planned tiny-qwen2 jobs and
    ran its GPU steps on the CPU."""
    demo = yaml.safe_load((ROOT / "config.yaml").read_text())
    demo["models"] = {"demo-only-model": demo["models"][next(iter(demo["models"]))]}
    demo["resources"] = {"gpu": {"gpu": 0}}  # the demo's CPU-only setting
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(demo))
    result = _dry_run(tmp_path, "--configfile", str(ROOT / "configs/qwen2.5-7b-alpaca.yaml"))
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "qwen2.5-7b-instruct" in out
    assert "demo-only-model" not in out
    assert not any(f"/{recipe}/" in out for recipe in demo["recipes"])  # the demo's recipes stay out
    # without --configfile, config.yaml is still the study
    result = _dry_run(tmp_path)
    assert result.returncode == 0 and "demo-only-model" in result.stdout + result.stderr


def test_gpu_e2e_study_plans(tmp_path):
    """configs/gpu-e2e.yaml validates and plans its stages (its chat rows generated first, as on the GPU)."""
    subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_e2e_data.py"), "--out",
                    str(tmp_path / "results/gpu-e2e-data/chat.jsonl"), "--rows", "40"], check=True, timeout=60)
    result = _dry_run(tmp_path, "all", "results/q7/sft-lora/adapter", "--configfile", str(ROOT / "configs/gpu-e2e.yaml"))
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    for job in ("train_full", "train_adapter", "merge_adapter", "quantize", "evaluate", "summary"):
        assert job in out
    assert "results/q7/sft-lora/adapter" in out and "results/q15/dpo-lora/fp8/model" in out
    assert "results/q7/base/model" in out and "results/q15/sft-lora" not in out


def test_tiny_model_real_vocabulary_rows_and_bf16(tmp_path):
    """padded_vocab_size gives a tiny model the embedding/LM-head rows of the real architecture
    (Qwen2.5: 151,936) beyond its ~600-token tokenizer; dtype: bf16 saves it as the hub does."""
    from safetensors import safe_open

    from snaketune.model import fetch

    params = dict(source="tiny", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, padded_vocab_size=4096, dtype="bf16", seed=0)
    fetch(params, tmp_path / "m")
    config = json.loads((tmp_path / "m/config.json").read_text())
    assert config["vocab_size"] == 4096
    with safe_open(str(tmp_path / "m/model.safetensors"), "pt") as fh:
        emb = fh.get_tensor("model.embed_tokens.weight")
    assert emb.shape == (4096, 32) and str(emb.dtype) == "torch.bfloat16"
    # unset: the tokenizer's size and fp32, as before
    fetch({k: v for k, v in params.items() if k not in ("padded_vocab_size", "dtype")}, tmp_path / "n")
    n = json.loads((tmp_path / "n/config.json").read_text())
    assert n["vocab_size"] < 1024 and n.get("dtype", n.get("torch_dtype")) == "float32"


def test_cuda_batches_are_copied_without_blocking(tmp_path):
    """On CUDA the Trainer's data loader copies pinned batches with ``non_blocking``: accelerate's
    default blocking copy waited for the previous step's kernels every step, so the GPU idled while
    the next batch was collated (the real 1.5B full step ran 4-9 % below the bench row; issue 13).
    On the CPU nothing changes."""
    from transformers import TrainingArguments

    from snaketune.schema import resolve
    from snaketune.training import trainer_args

    recipe = resolve("recipes", {"stage": "sft", "train_type": "full"})
    on_gpu = trainer_args(recipe, tmp_path, True, "bf16", 10)
    assert on_gpu["accelerator_config"] == {"non_blocking": True} and on_gpu["dataloader_pin_memory"]
    on_cpu = TrainingArguments(**trainer_args(recipe, tmp_path, False, "fp32", 10))
    assert not on_cpu.accelerator_config.non_blocking
