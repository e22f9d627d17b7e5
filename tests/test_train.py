"""The train step: label masking, truncation policy, LoRA/full outputs, preemption and resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from snaketune.train import EXIT_REQUEUE, tokenize_dataset, tokenize_pt, tokenize_sft, train
from snaketune.errors import SnaketuneError


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def test_sft_labels_cover_exactly_the_assistant_turns(tokenizer):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 1+2?"},
            {"role": "assistant", "content": "3"}, {"role": "user", "content": "And 2+2?"},
            {"role": "assistant", "content": "4"}]
    row = tokenize_sft(msgs, tokenizer, 512)
    supervised = tokenizer.decode([t for t, l in zip(row["input_ids"], row["labels"]) if l != -100])
    assert supervised == "3<|im_end|>\n4<|im_end|>\n"
    assert row["input_ids"] == tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=False)


def test_pt_labels_every_token_and_ends_with_eos(tokenizer):
    row = tokenize_pt("What is 1+2? 3", tokenizer, 512)
    assert row["labels"] == row["input_ids"] and row["input_ids"][-1] == tokenizer.eos_token_id


def test_truncation_policies_count_what_they_do(tokenizer, tiny_data):
    rows, stats = tokenize_dataset([tiny_data], "sft", tokenizer, 20, "truncate")
    assert stats["truncated"] > 0 and all(len(r["input_ids"]) <= 20 for r in rows)
    rows, stats = tokenize_dataset([tiny_data], "sft", tokenizer, 20, "drop")
    assert stats["dropped"] >= stats["truncated"] > 0
    with pytest.raises(SnaketuneError, match="no trainable samples"):
        tokenize_dataset([tiny_data], "sft", tokenizer, 8, "drop")


RECIPE = {"stage": "sft", "learning_rate": 5e-3, "batch_size": 16, "max_steps": 12, "max_length": 48,
          "logging_steps": 4, "save_steps": 4, "seed": 0}


class NullRun:
    def log_metrics(self, *a, **k):
        pass


@pytest.mark.parametrize("train_type", ["lora", "dora", "rslora", "full"])
def test_training_writes_a_loadable_artifact(train_type, tiny_model, tiny_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    summary = train(str(tiny_model), [str(tiny_data)], {**RECIPE, "train_type": train_type}, str(out),
                    str(tmp_path / "ckpt"), NullRun())
    assert summary["steps"] == 12 and summary["final_loss"] < summary["first_loss"]
    assert json.loads((out / "training.json").read_text())["steps"] == 12
    if train_type == "full":
        AutoModelForCausalLM.from_pretrained(out)
    else:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out)
        assert model.peft_config["default"].use_dora == (train_type == "dora")
        assert model.peft_config["default"].use_rslora == (train_type == "rslora")


def _train_cmd(tiny_model, tiny_data, out, ckpt, recipe):
    return [sys.executable, "-m", "snaketune.train", "--base", str(tiny_model), "--data", str(tiny_data),
            "--params", json.dumps(recipe), "--out", str(out), "--checkpoints", str(ckpt)]


def test_sigterm_checkpoints_and_rerun_resumes_to_the_same_adapter(tiny_model, tiny_data, tmp_path):
    """Preempt a run with SIGTERM, rerun it, and compare with an uninterrupted run."""
    from safetensors.torch import load_file

    recipe = {**RECIPE, "train_type": "lora", "max_steps": 40, "save_steps": 5}
    ref = tmp_path / "ref"
    train(str(tiny_model), [str(tiny_data)], recipe, str(ref), str(tmp_path / "ref.ckpt"), NullRun())

    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_train_cmd(tiny_model, tiny_data, out, ckpt, recipe), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # wait until training is under way, then preempt
        if line.startswith("step 8/"):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.communicate(timeout=300)[0]
    assert proc.returncode == EXIT_REQUEUE, rest
    assert "rerun to resume" in rest and not out.exists()
    saved = sorted(ckpt.glob("checkpoint-*"))
    assert saved, "no checkpoint written on SIGTERM"

    done = subprocess.run(_train_cmd(tiny_model, tiny_data, out, ckpt, recipe), env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from" in done.stdout
    a, b = load_file(ref / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max().item() < 1e-5, key
