"""Alignment recipes in the DAG: sft -> dpo -> merge -> quantize -> eval is one path, and grpo
rewards can name an rm recipe, whose folder the workflow passes to the step."""

import json
import re

import pytest
import yaml

from conftest import ROOT, snakemake

pytestmark = pytest.mark.slow


def align_config():
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config["models"]["tiny-qwen2"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    config["datasets"]["arith"].update(max_operand=12, n_test=20)
    config["recipes"]["pt"].update(epochs=2)
    config["recipes"]["sft-lora"].update(max_steps=10)
    config["recipes"]["dpo"] = {"stage": "dpo", "from": "sft-lora", "train_type": "lora", "dataset": "arith",
                                "dpo": {"beta": 0.5}, "learning_rate": 1e-3, "max_steps": 4, "batch_size": 8,
                                "logging_steps": 2}
    config["recipes"]["rm"] = {"stage": "rm", "from": "sft-lora", "train_type": "full", "dataset": "arith",
                               "max_steps": 2, "batch_size": 8}
    config["recipes"]["grpo"] = {"stage": "grpo", "from": "dpo", "train_type": "lora", "dataset": "arith",
                                 "max_steps": 1, "batch_size": 2,
                                 "grpo": {"num_generations": 2, "max_completion_length": 4,
                                          "rewards": [{"name": "exact_match"},
                                                      {"name": "reward_model", "recipe": "rm", "weight": 0.5}]}}
    config["evaluation"]["variants"] = ["sft-lora", "dpo", "dpo/fp8"]
    config.pop("serving")
    return config


def test_dpo_chain_plans_and_grpo_gets_the_reward_model(tmp_path):
    """The grpo job gets the rm recipe's folder, and its user reward and tool files as inputs."""
    config = align_config()
    config["recipes"]["grpo"]["grpo"]["rewards"].append({"name": "my_rewards.py:short", "weight": 0.1})
    config["recipes"]["grpo"]["grpo"]["tools"] = ["my_tools.py:add"]
    (tmp_path / "my_rewards.py").write_text("def short(prompts, completions, **kw):\n    return [0.0] * len(completions)\n")
    (tmp_path / "my_tools.py").write_text("def add(a: int, b: int) -> int:\n    return a + b\n")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    plan = snakemake(tmp_path, "-n", "-p", "results/tiny-qwen2/grpo/adapter")
    out = plan.stdout + plan.stderr
    assert plan.returncode == 0, out[-3000:]
    assert "snaketune.align" in out and '"path": "results/tiny-qwen2/rm/model"' in out
    assert "results/tiny-qwen2/rm/model" in re.search(r"rule train_adapter:.*?recipe=grpo", out, re.S).group(0)
    (inputs,) = [line for line in out.splitlines() if "input:" in line and "rm/model" in line]
    assert inputs.split("input:")[1].split(", ")[-2:] == ["my_rewards.py", "my_tools.py"]


def test_sft_dpo_merge_quantize_eval_runs(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(align_config()))
    result = snakemake(tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    res = tmp_path / "results/tiny-qwen2"
    training = json.loads((res / "dpo/adapter/training.json").read_text())
    assert training["stage"] == "dpo" and (res / "dpo/adapter/adapter_config.json").is_file()
    assert (res / "dpo/model/merge.json").is_file() and (res / "dpo/fp8/model/quantization.json").is_file()
    rows = json.loads((tmp_path / "results/summary.json").read_text())["rows"]
    assert {r["variant"] for r in rows} == {"sft-lora", "dpo", "dpo/fp8"}
