"""The train step: label masking, truncation policy, LoRA/full outputs, preemption and resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from snaketune.train import tokenize_dataset, tokenize_pt, tokenize_sft, train
from snaketune.training import EXIT_REQUEUE
from snaketune.errors import SnaketuneError
from snaketune.schema import resolve

from conftest import TINY, read_jsonl


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
    assert supervised == "3<|im_end|>\n4<|im_end|>\n"  # and the newline ChatML puts after a turn (ms-swift's labels)
    assert row["input_ids"] == tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=False)
    row = tokenize_sft(msgs, tokenizer, 512, label_separator=False)
    supervised = tokenizer.decode([t for t, l in zip(row["input_ids"], row["labels"]) if l != -100])
    assert supervised == "3<|im_end|>4<|im_end|>"


# the parity study's template (../shared/parity/build_tiny.py): Jinja's trim_blocks eats the newline
# written after {% endgeneration %}, so assistant turns render no separator; ms-swift's ChatML does
GENERATION_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "<|im_start|>assistant\n{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}\n"
    "{% else %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_separator_appended_where_the_template_renders_none(tokenizer):
    """The conversation ends as ms-swift's ChatML ends it ('<|im_end|>' then a labelled newline,
    the separator the template puts after user turns), with the same labels ms-swift 4.6 gives."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = GENERATION_TEMPLATE
    msgs = [{"role": "user", "content": "What is 15+34?"}, {"role": "assistant", "content": "49"}]
    assert tok.apply_chat_template(msgs, tokenize=False).endswith("49<|im_end|>")
    row = tokenize_sft(msgs, tok, 512)
    assert tok.decode(row["input_ids"]).endswith("49<|im_end|>\n")
    supervised = [t for t, l in zip(row["input_ids"], row["labels"]) if l != -100]
    assert tok.decode(supervised) == "49<|im_end|>\n"
    assert row["labels"][-1] == row["input_ids"][-1] == tok.encode("\n", add_special_tokens=False)[0]
    row = tokenize_sft(msgs, tok, 512, label_separator=False)
    assert tok.decode([t for t, l in zip(row["input_ids"], row["labels"]) if l != -100]) == "49<|im_end|>"


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


@pytest.mark.parametrize("train_type", ["lora", "dora", "rslora", "full"])
def test_training_writes_a_loadable_artifact(train_type, tiny_model, tiny_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    summary = train(str(tiny_model), [str(tiny_data)], {**RECIPE, "train_type": train_type}, str(out),
                    str(tmp_path / "ckpt"))
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


@pytest.mark.parametrize("broken", ["adapter_model.safetensors", "trainer_state.json", "optimizer.pt"])
def test_a_broken_newest_checkpoint_falls_back_to_the_one_before(broken, tiny_model, tiny_data, tmp_path, capfd):
    """A newest checkpoint cut short (killed or disk full while it was written) is set aside with a
    warning and the run resumes from the previous one, ending where an unbroken run ends."""
    from safetensors.torch import load_file

    recipe = {**RECIPE, "train_type": "lora", "max_steps": 12, "save_steps": 4, "keep_checkpoints": True}
    ref, ckpt = tmp_path / "ref", tmp_path / "ckpt"
    train(str(tiny_model), [str(tiny_data)], recipe, str(ref), str(ckpt))
    newest = ckpt / "checkpoint-12"
    assert newest.is_dir() and (ckpt / "checkpoint-8").is_dir()
    target = newest / broken
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    capfd.readouterr()

    summary = train(str(tiny_model), [str(tiny_data)], recipe, str(tmp_path / "out"), str(ckpt))
    err = capfd.readouterr().err
    assert f"checkpoint {newest} is broken ({broken}" in err and "resuming from the one before it" in err
    assert summary["resumed_from"] == str(ckpt / "checkpoint-8") and (ckpt / "broken-checkpoint-12").is_dir()
    a, b = load_file(ref / "adapter_model.safetensors"), load_file(tmp_path / "out/adapter_model.safetensors")
    for key in a:
        assert (a[key] - b[key]).abs().max().item() < 1e-5, key


def test_a_checkpoint_is_checked_as_it_is_written(tiny_model, tiny_data, tmp_path, capfd, monkeypatch):
    """A save that leaves a broken checkpoint (here: its weights cut short as a full disk would) is
    set aside right after it is written, with a warning; the run goes on and ends normally."""
    from transformers import Trainer

    save = Trainer._save_checkpoint

    def short_save(self, model, trial):
        save(self, model, trial)
        if self.state.global_step == 8:
            f = Path(self.args.output_dir) / "checkpoint-8" / "adapter_model.safetensors"
            f.write_bytes(f.read_bytes()[:100])

    monkeypatch.setattr(Trainer, "_save_checkpoint", short_save)
    recipe = {**RECIPE, "train_type": "lora", "max_steps": 12, "save_steps": 4, "keep_checkpoints": True}
    train(str(tiny_model), [str(tiny_data)], recipe, str(tmp_path / "out"), str(tmp_path / "ckpt"))
    err = capfd.readouterr().err
    assert "checkpoint-8 is broken (adapter_model.safetensors" in err and "training goes on" in err
    assert (tmp_path / "ckpt/broken-checkpoint-8").is_dir() and (tmp_path / "out/adapter_model.safetensors").is_file()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGKILL], ids=lambda s: s.name)
def test_interrupted_run_resumes_to_the_same_adapter(sig, tiny_model, tiny_data, tmp_path):
    """Stop a run mid-way (SIGTERM/SIGUSR1 as Slurm sends: checkpoint and exit 75; SIGKILL: no
    warning, the last periodic checkpoint), rerun it, and compare with an uninterrupted run."""
    from safetensors.torch import load_file

    recipe = {**RECIPE, "train_type": "lora", "max_steps": 40, "save_steps": 5}
    ref = tmp_path / "ref"
    train(str(tiny_model), [str(tiny_data)], recipe, str(ref), str(tmp_path / "ref.ckpt"))

    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    import mlflow

    client = mlflow.MlflowClient(json.loads(os.environ["SNAKETUNE_TRACKING"])["uri"])
    client.search_experiments()  # the store's tables exist before the run: a SIGKILL must not cut their creation
    proc = subprocess.Popen(_train_cmd(tiny_model, tiny_data, out, ckpt, recipe), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # training under way (past checkpoint-10) and its MLflow run made: stop it
        if line.startswith("step ") and int(line.split()[1].split("/")[0]) >= 12 and (ckpt / "mlflow_run.json").exists():
            proc.send_signal(sig)
            break
    rest = proc.communicate(timeout=300)[0]
    assert not out.exists()
    experiment = client.get_experiment_by_name("test").experiment_id
    [stopped] = client.search_runs([experiment])
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        assert stopped.info.status == "RUNNING"  # nothing ran to end it
    else:
        assert proc.returncode == EXIT_REQUEUE, rest
        assert "rerun to resume" in rest
        assert stopped.info.status == "KILLED" and "a rerun resumes it in this run" in stopped.data.tags["stopped"]
    assert json.loads((ckpt / "mlflow_run.json").read_text())["run_id"] == stopped.info.run_id
    saved = sorted(ckpt.glob("checkpoint-*"))
    assert saved, f"no checkpoint left after {sig.name}"

    done = subprocess.run(_train_cmd(tiny_model, tiny_data, out, ckpt, recipe), env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from" in done.stdout
    # one MLflow run for the whole training: the stopped run, continued and FINISHED
    [run] = client.search_runs([experiment])
    assert run.info.run_id == stopped.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["snaketune.resumes"] == "1" and "error" not in run.data.tags
    logged = {m.step for m in client.get_metric_history(run.info.run_id, "loss")}
    assert {4, 8, 12, 36, 40} <= logged  # before the stop and after the resume
    assert not (ckpt / "mlflow_run.json").exists()  # a later training is a new run
    assert not ckpt.exists() and "deleted the checkpoints" in done.stdout  # finished: resume state is only disk
    a, b = load_file(ref / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max().item() < 1e-5, key
    # the record too: the resumed run's train_loss and loss history are the uninterrupted run's
    ra, rb = (json.loads((d / "training.json").read_text()) for d in (ref, out))
    assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-4)
    losses = [[(h["step"], h["loss"]) for h in r["log_history"] if "loss" in h] for r in (ra, rb)]
    assert [s for s, _ in losses[1]] == [s for s, _ in losses[0]]
    assert [v for _, v in losses[1]] == pytest.approx([v for _, v in losses[0]], rel=1e-4)


def test_system_prompt_is_prepended_only_where_missing(tokenizer):
    plain = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    row = tokenize_sft(plain, tokenizer, 512, system="Be brief.")
    assert tokenizer.decode(row["input_ids"]).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    own = [{"role": "system", "content": "Mine."}, *plain]
    assert "Be brief." not in tokenizer.decode(tokenize_sft(own, tokenizer, 512, system="Be brief.")["input_ids"])


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_merges_into_the_weights_it_was_trained_on(bits, tiny_model, tiny_data, tmp_path, capsys, monkeypatch):
    """A QLoRA adapter is merged into its base's dequantized 4/8-bit weights: the merged model
    answers like the model as trained (quantized base + adapter), while the same adapter merged
    into the full-precision base (what the step did before) is measurably further off."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import snaketune.merge as merge_step
    from snaketune.training import qlora_config

    recipe = {**RECIPE, "train_type": "qlora", "quantization": {"bits": bits}, "max_steps": 6, "logging_steps": 2}
    summary = train(str(tiny_model), [str(tiny_data)], recipe, str(tmp_path / "adapter"), str(tmp_path / "ckpt"))
    assert summary["base_quantization"]["bits"] == bits and summary["final_loss"] < summary["first_loss"]
    record = merge_step.merge(str(tiny_model), str(tmp_path / "adapter"), str(tmp_path / "merged"))
    assert "merged into the dequantized" in capsys.readouterr().out
    assert record["qlora_base"]["bits"] == bits and record["dtype"] == "float32"
    assert record["max_logit_diff"] == record["max_logit_diff_vs_as_trained"] <= record["qlora_tolerance"]

    ids = torch.tensor([[5, 17, 42, 99, 3, 7, 11]])
    quantized = AutoModelForCausalLM.from_pretrained(
        tiny_model, dtype=torch.float32, quantization_config=qlora_config(recipe["quantization"], torch.float32))
    fp32_merge = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                                           tmp_path / "adapter").merge_and_unload()
    peft_quantized = PeftModel.from_pretrained(quantized, tmp_path / "adapter")
    peft_quantized.enable_input_require_grads()  # the forward of training (bitsandbytes' training matmul)
    with torch.enable_grad():
        as_trained = peft_quantized(ids).logits.detach()
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(ids).logits
        theirs = fp32_merge(ids).logits
    ours_off, theirs_off = ((x - as_trained).abs().max().item() for x in (ours, theirs))
    print(f"{bits}-bit: merged into dequantized weights {ours_off:.2e}, into the fp32 base {theirs_off:.2e}")
    if bits == 4:  # 8-bit also quantizes activations, so no merge reproduces it more closely than ~1e-2
        assert theirs_off > 5 * ours_off

    monkeypatch.setattr(merge_step, "QLORA_TOLERANCE", 0.0)
    with pytest.raises(SnaketuneError, match="differs from the model as trained"):
        merge_step.merge(str(tiny_model), str(tmp_path / "adapter"), str(tmp_path / "merged2"))
    assert not (tmp_path / "merged2").exists()


def test_freeze_trains_only_the_chosen_parts(tiny_model, tiny_data, tmp_path):
    from safetensors.torch import load_file

    recipe = {**RECIPE, "train_type": "freeze", "max_steps": 4,
              "freeze": {"trainable_layers": 1, "trainable_modules": [r"^model\.norm\."]}}
    summary = train(str(tiny_model), [str(tiny_data)], recipe, str(tmp_path / "out"), str(tmp_path / "ckpt"))
    before, after = load_file(tiny_model / "model.safetensors"), load_file(tmp_path / "out/model.safetensors")
    changed = {k for k in before if not (before[k] == after[k]).all()}
    assert changed and all(k.startswith(("model.layers.1.", "model.norm.")) for k in changed), changed
    assert summary["trainable_params"] < summary["total_params"]
    with pytest.raises(SnaketuneError, match="freeze leaves nothing to train"):
        train(str(tiny_model), [str(tiny_data)], {**recipe, "freeze": {}}, str(tmp_path / "x"))


def test_tokenized_data_is_cached_by_content(tiny_model, tiny_data, tmp_path, capsys):
    recipe = {**RECIPE, "train_type": "lora", "max_steps": 1}
    train(str(tiny_model), [str(tiny_data)], recipe, str(tmp_path / "a"), str(tmp_path / "ca"), cache_dir=str(tmp_path / "cache"))
    assert "from cache" not in capsys.readouterr().out
    train(str(tiny_model), [str(tiny_data)], {**recipe, "learning_rate": 1e-3}, str(tmp_path / "b"),
          str(tmp_path / "cb"), cache_dir=str(tmp_path / "cache"))
    assert "tokenized data from cache" in capsys.readouterr().out
    train(str(tiny_model), [str(tiny_data)], {**recipe, "max_length": 20}, str(tmp_path / "c"),
          str(tmp_path / "cc"), cache_dir=str(tmp_path / "cache"))
    assert "from cache" not in capsys.readouterr().out
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_distributed_strategies_map_to_trainer_arguments():
    import snaketune.training as train_module

    def distributed_args(recipe, cuda):
        return train_module.distributed_args(resolve("recipes", recipe), cuda)

    assert distributed_args({}, cuda=False)["ddp_backend"] == "gloo"
    fsdp = distributed_args({"distributed": {"strategy": "fsdp"}, "gradient_checkpointing": True}, cuda=True)
    assert fsdp["fsdp"] is True and fsdp["fsdp_config"]["version"] == 2 and not fsdp["fsdp_config"]["cpu_offload"]
    assert fsdp["fsdp_config"]["activation_checkpointing"] is True
    ds = distributed_args({"distributed": {"strategy": "deepspeed", "zero_stage": 3, "offload": True}}, cuda=True)
    zero = ds["deepspeed"]["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == "cpu"
    assert distributed_args({"distributed": {"strategy": "deepspeed", "zero_stage": 2}}, cuda=True)[
        "deepspeed"]["zero_optimization"].get("offload_param") is None
    with pytest.raises(SnaketuneError, match="use ddp, fsdp or deepspeed"):
        distributed_args({"distributed": {"strategy": "horovod"}}, cuda=True)


def test_ddp_on_two_cpu_processes_matches_one_process_with_the_same_global_batch(tiny_model, tiny_data, tmp_path):
    """torchrun with 2 gloo processes x batch 8 gives the loss curve of 1 process x batch 16."""
    recipe = {**RECIPE, "train_type": "lora", "max_steps": 8, "logging_steps": 1, "save_steps": 100}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    single = subprocess.run(_train_cmd(tiny_model, tiny_data, tmp_path / "one", tmp_path / "c1",
                                       {**recipe, "batch_size": 16}), env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd = _train_cmd(tiny_model, tiny_data, tmp_path / "two", tmp_path / "c2", {**recipe, "batch_size": 8})
    double = subprocess.run(torchrun + cmd[1:], env=env, capture_output=True, text=True, timeout=600)
    assert double.returncode == 0, (double.stdout + double.stderr)[-3000:]
    one = json.loads((tmp_path / "one/training.json").read_text())
    two = json.loads((tmp_path / "two/training.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    curve = lambda s: [h["loss"] for h in s["log_history"] if "loss" in h]  # noqa: E731
    assert len(curve(one)) == len(curve(two)) == 8
    for a, b in zip(curve(one), curve(two)):
        assert abs(a - b) < 2e-3 * max(1.0, abs(a)), (curve(one), curve(two))


def test_training_json_reports_steady_state_tokens_per_s(tiny_model, tiny_data, tmp_path, monkeypatch):
    """tokens_per_s is the steady state: a slow first step (as torch.compile makes it) and the
    final checkpoint save are left out of it; wall_seconds holds both, warmup_seconds the first.
    MLflow gets the same numbers (main) and a per-log rate (the callback)."""
    from transformers import Trainer

    from snaketune.tracking import MemoryRun
    from snaketune.training import WARMUP_STEPS

    step, save = Trainer.training_step, Trainer._save_checkpoint

    def slow_first_step(self, *args, **kw):
        if self.state.global_step == 0:
            time.sleep(1.0)
        return step(self, *args, **kw)

    def slow_save(self, *args, **kw):
        time.sleep(1.0)
        return save(self, *args, **kw)

    monkeypatch.setattr(Trainer, "training_step", slow_first_step)
    monkeypatch.setattr(Trainer, "_save_checkpoint", slow_save)
    run = MemoryRun()
    recipe = {**RECIPE, "train_type": "lora", "max_steps": 12, "save_steps": 100}
    train(str(tiny_model), [str(tiny_data)], recipe, str(tmp_path / "out"), str(tmp_path / "ckpt"), run)
    t = json.loads((tmp_path / "out" / "training.json").read_text())
    assert (t["warmup_steps"], t["steady_steps"]) == (WARMUP_STEPS, 12 - WARMUP_STEPS)
    assert t["warmup_seconds"] >= 1.0  # the slow first step
    assert t["warmup_seconds"] + t["steady_seconds"] + 1.0 <= t["wall_seconds"]  # the save is in neither
    assert 0 < t["steady_tokens"] < t["tokens"]
    assert t["tokens_per_s"] == pytest.approx(t["steady_tokens"] / t["steady_seconds"])
    assert t["tokens_per_s"] > t["tokens"] / (t["wall_seconds"] - 2.0) > t["tokens"] / t["wall_seconds"]
    rates = run.metrics["interval_tokens_per_s"]  # one per log (every 4 steps): the first holds the slow step
    assert len(rates) == 3 and rates[0] < min(rates[1:])


def test_packing_and_fused_ce_train_through_the_trainer(tiny_model, tiny_data, tmp_path, monkeypatch):
    """The GPU speed options also run on CPU: same recipe keys, padding-free batches, chunked CE.
    Packed batches' tokens are counted from their shape, not by transformers' per-step device
    read-back (a host sync on a GPU), and add up to the padded run's non-padding count."""
    from transformers import Trainer

    calls = []
    count = Trainer._track_num_input_tokens
    monkeypatch.setattr(Trainer, "_track_num_input_tokens", lambda self, inputs: calls.append(1) or count(self, inputs))
    recipe = {**RECIPE, "train_type": "lora", "packing": True, "fused_ce": True, "gradient_checkpointing": True}
    summary = train(str(tiny_model), [str(tiny_data)], recipe, str(tmp_path / "out"), str(tmp_path / "ckpt"))
    assert summary["speedups"] == {"fused_ce": True, "fast_lora": False, "packing": True, "compile": False}
    assert summary["final_loss"] < summary["first_loss"]
    assert not calls
    plain = train(str(tiny_model), [str(tiny_data)], {**RECIPE, "train_type": "lora"}, str(tmp_path / "plain"),
                  str(tmp_path / "ckpt2"))
    assert len(calls) == plain["steps"]  # padded batches (attention_mask) still go through transformers
    assert summary["tokens"] == plain["tokens"] > 0
    assert abs(summary["first_loss"] - plain["first_loss"]) < 0.05 * plain["first_loss"]


def test_fsdp2_single_process_matches_plain_training(tiny_model, tiny_data, tmp_path):
    """The FSDP2 path (as on GPUs) runs on one CPU process and computes the same losses."""
    recipe = {**RECIPE, "train_type": "full", "max_steps": 4, "logging_steps": 1}
    plain = train(str(tiny_model), [str(tiny_data)], recipe, str(tmp_path / "plain"), str(tmp_path / "c1"))
    code = ("import json, sys; from snaketune.train import train; "
            "s = train(sys.argv[1], [sys.argv[2]], json.loads(sys.argv[3]), sys.argv[4], sys.argv[5]); "
            "print('LOSSES', json.dumps([h['loss'] for h in s['log_history'] if 'loss' in h]))")
    fsdp = {**recipe, "distributed": {"strategy": "fsdp"}}
    result = subprocess.run([sys.executable, "-c", code, str(tiny_model), str(tiny_data), json.dumps(fsdp),
                             str(tmp_path / "fsdp"), str(tmp_path / "c2")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = json.loads(result.stdout.split("LOSSES", 1)[1])
    assert losses == pytest.approx([h["loss"] for h in plain["log_history"] if "loss" in h], rel=1e-4)
    assert (tmp_path / "fsdp/model.safetensors").is_file()


@pytest.mark.parametrize("master, expected", [("fp32", "torch.float32"), ("dtype", "torch.bfloat16")])
def test_full_recipes_keep_fp32_master_weights_unless_told_otherwise(master, expected, tiny_model):
    import torch

    from snaketune.training import load_model

    recipe = {**RECIPE, "train_type": "full", "dtype": "bf16", "master_weights": master}
    model = load_model(str(tiny_model), resolve("recipes", recipe), torch.bfloat16, cuda=False)
    assert {str(p.dtype) for p in model.parameters()} == {expected}
    lora = load_model(str(tiny_model), resolve("recipes", {**recipe, "train_type": "lora"}), torch.bfloat16, cuda=False)
    assert {str(p.dtype) for p in lora.parameters()} == {"torch.bfloat16"}  # frozen base in dtype


@pytest.mark.parametrize("train_type", ["pissa", "olora"])
def test_base_rewriting_adapters_are_saved_as_plain_lora_on_the_original_base(train_type, tiny_model, tiny_data, tmp_path):
    """PiSSA/OLoRA train on a rewritten base; the saved adapter, loaded on the original base, must
    compute what the trained model computed (its last checkpoint, on the rewritten base)."""
    import torch
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from snaketune.training import wrap_model

    recipe = {**RECIPE, "train_type": train_type, "lora": {"r": 4, "alpha": 8}, "keep_checkpoints": True}
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    summary = train(str(tiny_model), [str(tiny_data)], recipe, str(out), str(ckpt))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True and "adapter_converted_from" in summary

    ids = torch.arange(3, 40).reshape(1, -1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        plain = base(ids).logits
        saved = PeftModel.from_pretrained(base, out)(ids).logits
    trained = wrap_model(AutoModelForCausalLM.from_pretrained(tiny_model), resolve("recipes", recipe))  # rewrites the base again
    set_peft_model_state_dict(trained, load_file(ckpt / "checkpoint-12" / "adapter_model.safetensors"))
    with torch.no_grad():
        reference = trained(ids).logits
    assert (saved - plain).abs().max() > 1e-3  # the adapter changes the model
    assert torch.allclose(saved, reference, atol=1e-4), (saved - reference).abs().max()


def test_gradient_accumulation_matches_the_larger_batch(tiny_model, tiny_data, tmp_path):
    """batch 8 x 2 accumulation steps trains the same weights as batch 16 (same samples per step)."""
    from safetensors.torch import load_file

    recipe = {**RECIPE, "train_type": "full", "max_steps": 4, "logging_steps": 1}
    big = train(str(tiny_model), [str(tiny_data)], {**recipe, "batch_size": 16}, str(tmp_path / "a"), str(tmp_path / "ca"))
    acc = train(str(tiny_model), [str(tiny_data)], {**recipe, "batch_size": 8, "gradient_accumulation_steps": 2},
                str(tmp_path / "b"), str(tmp_path / "cb"))
    curve = lambda s: [h["loss"] for h in s["log_history"] if "loss" in h]  # noqa: E731
    assert curve(acc) == pytest.approx(curve(big), rel=1e-4)
    a, b = load_file(tmp_path / "a/model.safetensors"), load_file(tmp_path / "b/model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_mixed_datasets_with_a_sample_cap(tiny_model, tiny_data, tmp_path):
    """Two datasets in one recipe (the second capped at 30 rows, ms-swift's ``name#30``)."""
    from snaketune.data import prepare

    capped = tmp_path / "capped"
    prepare({"source": "synthetic", "max_operand": 9, "n_test": 5, "seed": 3, "samples": 30}, capped)
    assert len(read_jsonl(capped / "train.jsonl")) == 30
    n_first = len(read_jsonl(tiny_data / "train.jsonl"))
    summary = train(str(tiny_model), [str(tiny_data), str(capped)], {**RECIPE, "train_type": "lora", "max_steps": 2},
                    str(tmp_path / "out"), str(tmp_path / "ckpt"))
    assert summary["data"]["samples"] == n_first + 30


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_recipes_train_on_cpu(dtype, tiny_model, tiny_data, tmp_path):
    """dtype bf16/fp16: LoRA on a half-precision base, full fine-tuning with fp32 master weights
    under autocast; both learn and save."""
    from safetensors.torch import load_file

    for train_type in ("lora", "full"):
        out = tmp_path / train_type
        summary = train(str(tiny_model), [str(tiny_data)], {**RECIPE, "train_type": train_type, "dtype": dtype},
                        str(out), str(tmp_path / f"{train_type}.ckpt"))
        assert summary["dtype"] == dtype and summary["final_loss"] < summary["first_loss"], summary
    assert {str(t.dtype) for t in load_file(tmp_path / "full/model.safetensors").values()} == {"torch.float32"}


def test_checkpoints_of_another_recipe_are_not_resumed(tiny_model, tiny_data, tmp_path, capsys):
    """A rerun with a changed recipe key starts over (the old checkpoints are removed, with the
    reason printed); a rerun with the same recipe resumes."""
    recipe = {**RECIPE, "train_type": "lora", "max_steps": 8, "save_steps": 4, "keep_checkpoints": True}
    ckpt = tmp_path / "ckpt"
    train(str(tiny_model), [str(tiny_data)], recipe, str(tmp_path / "a"), str(ckpt))
    again = train(str(tiny_model), [str(tiny_data)], recipe, str(tmp_path / "b"), str(ckpt))
    assert again["resumed_from"].endswith("checkpoint-8")
    changed = train(str(tiny_model), [str(tiny_data)], {**recipe, "learning_rate": 1e-3}, str(tmp_path / "c"), str(ckpt))
    assert changed["resumed_from"] is None and changed["steps"] == 8
    assert "recipe keys changed: learning_rate): starting over" in capsys.readouterr().out


def test_running_out_of_gpu_memory_ends_as_advice(tiny_model, tiny_data, tmp_path, monkeypatch, capsys):
    """A CUDA out-of-memory in a training step ends the step with exit 2 and advice, no traceback:
    the step reached, what the recipe asked for and the recipe keys that need less memory. The
    checkpoints written before it stay; no output folder is written."""
    import torch
    from transformers import Trainer

    from snaketune.train import main

    step = Trainer.training_step

    def oom_at_step_4(self, *args, **kw):
        if self.state.global_step == 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 788.00 MiB. GPU 0 has a total "
                                         "capacity of 79.18 GiB of which 160.19 MiB is free.")
        return step(self, *args, **kw)

    monkeypatch.setattr(Trainer, "training_step", oom_at_step_4)
    recipe = {**RECIPE, "train_type": "lora", "max_steps": 12, "save_steps": 4}
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    with pytest.raises(SystemExit) as exit_:
        main(["--base", str(tiny_model), "--data", str(tiny_data), "--params", json.dumps(recipe),
              "--out", str(out), "--checkpoints", str(ckpt), "--variant", "tiny"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert "snaketune: error: out of GPU memory after 4 of 12 steps (tried to allocate 788.00 MiB): " \
           "batch_size 16 x gradient_accumulation_steps 1 per device at max_length 48." in err
    for fix in ("gradient_checkpointing: true", "batch_size: 8 with recipes.tiny.gradient_accumulation_steps: 2",
                "max_length: 24", "train_type: qlora"):
        assert f"\n  recipes.tiny.{fix} (" in err
    assert err.index("gradient_checkpointing") < err.index("batch_size: 8") < err.index("max_length: 24") \
        < err.index("qlora")  # cheapest first
    assert (ckpt / "checkpoint-4").is_dir() and not out.exists() and not (tmp_path / ".out.partial").exists()


def test_qlora_merge_of_a_bf16_training_is_checked_in_fp32(tiny_model, tiny_data, tmp_path):
    """A QLoRA adapter trained with bf16 compute (as on a GPU) merges: the check against the model
    as trained runs both sides in fp32, so bf16 rounding (0.0625 at logit scale 11.6 on an H200,
    over the 2e-3 relative tolerance) does not fail a correct merge; the saved model stays bf16."""
    import snaketune.merge as merge_step

    recipe = {**RECIPE, "train_type": "qlora", "dtype": "bf16", "max_steps": 4, "logging_steps": 2}
    summary = train(str(tiny_model), [str(tiny_data)], recipe, str(tmp_path / "adapter"), str(tmp_path / "ckpt"))
    assert summary["dtype"] == "bf16"
    record = merge_step.merge(str(tiny_model), str(tmp_path / "adapter"), str(tmp_path / "merged"))
    assert record["dtype"] == "bfloat16"
    assert record["max_logit_diff_vs_as_trained"] <= record["qlora_tolerance"]


def test_lora_merge_into_a_bf16_base_is_done_in_fp32(tiny_data, tmp_path):
    """A LoRA adapter on a bf16 base is merged in fp32 and cast once: merge.json's difference is
    fp32 arithmetic, the saved model is bf16 and the cost of that cast is recorded beside it."""
    import torch
    from transformers import AutoModelForCausalLM

    import snaketune.merge as merge_step
    from snaketune.model import fetch

    fetch({**TINY, "dtype": "bf16"}, tmp_path / "base")
    recipe = {**RECIPE, "train_type": "lora", "max_steps": 4, "logging_steps": 2}
    train(str(tmp_path / "base"), [str(tiny_data)], recipe, str(tmp_path / "adapter"), str(tmp_path / "ckpt"))
    record = merge_step.merge(str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "merged"))
    assert record["dtype"] == "bfloat16" and record["max_logit_diff"] < 1e-4
    assert 0 < record["max_logit_diff_saved_dtype"] < 0.5
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged").dtype == torch.bfloat16


def test_full_fine_tune_of_a_bf16_base_is_saved_in_bf16(tiny_data, tmp_path):
    """fp32 master weights train a bf16 base; the saved model is bf16 again, as its base (the
    H200 study's 1.5B came out fp32 at twice its base's size)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from snaketune.model import fetch

    fetch({**TINY, "dtype": "bf16"}, tmp_path / "base")
    recipe = {**RECIPE, "train_type": "full", "max_steps": 4, "logging_steps": 2}
    summary = train(str(tmp_path / "base"), [str(tiny_data)], recipe, str(tmp_path / "out"), str(tmp_path / "ckpt"))
    assert summary["final_loss"] < summary["first_loss"]
    weights = load_file(tmp_path / "out" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    base = load_file(tmp_path / "base" / "model.safetensors")
    assert any(not torch.equal(weights[k], base[k]) for k in base)  # the training is in the saved weights
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").dtype == torch.bfloat16


def test_eval_steps_logs_the_held_out_loss_and_leaves_training_as_it_was(tiny_model, tiny_data, tmp_path, capsys):
    """eval_steps: the loss on the data step's test.jsonl every N steps and at the end, in the log,
    MLflow (eval_loss), training.json; the training itself (losses, weights) is the run without it."""
    import math

    import torch
    from safetensors.torch import load_file

    from snaketune.tracking import MemoryRun

    recipe = {**RECIPE, "train_type": "lora", "max_steps": 12, "logging_steps": 4}
    plain = train(str(tiny_model), [str(tiny_data)], recipe, str(tmp_path / "plain"), str(tmp_path / "plain.ckpt"))
    capsys.readouterr()
    run = MemoryRun()
    evald = train(str(tiny_model), [str(tiny_data)], {**recipe, "eval_steps": 5}, str(tmp_path / "eval"),
                  str(tmp_path / "eval.ckpt"), run)
    out = capsys.readouterr().out
    assert "held-out data for eval_steps (test.jsonl): 20 samples" in out  # the 20 held-out sums
    evals = [(h["step"], h["eval_loss"]) for h in evald["log_history"] if "eval_loss" in h]
    assert [s for s, _ in evals] == [5, 10, 12] and all(math.isfinite(v) and v > 0 for _, v in evals)
    assert [f"eval {s}/12 | eval_loss {v:.4f} (held-out)" for s, v in evals] == \
        [ln for ln in out.splitlines() if ln.startswith("eval ")]
    assert run.metrics["eval_loss"] == [v for _, v in evals] and evald["eval_loss"] == evals[-1][1]
    assert json.loads((tmp_path / "eval/training.json").read_text())["eval_loss"] == evals[-1][1]
    assert plain["eval_loss"] is None
    losses = [[(h["step"], h["loss"]) for h in r["log_history"] if "loss" in h] for r in (plain, evald)]
    assert losses[0] == losses[1]
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("plain", "eval"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_eval_steps_without_a_held_out_split_names_the_fix(tiny_model, tmp_path):
    from snaketune.data import prepare

    data = tmp_path / "data"
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{i}+1?"},
                                                     {"role": "assistant", "content": str(i + 1)}]}) + "\n"
                            for i in range(20)))
    prepare({"source": "local", "path": str(rows), "format": "messages", "test_size": 0}, data)
    with pytest.raises(SnaketuneError, match=r"eval_steps: the held-out split \(test.jsonl\) of .* is empty: give "
                                             "those datasets a test_size above 0 or a test_path"):
        train(str(tiny_model), [str(data)], {**RECIPE, "train_type": "lora", "eval_steps": 2}, str(tmp_path / "o"))


@pytest.mark.parametrize("train_type", ["qlora", "lora"])
def test_gradient_checkpointing_is_not_reentrant(train_type, tiny_model, tiny_data, tmp_path):
    """torch warns on every checkpointed step when use_reentrant is not said (and will raise): the
    7B QLoRA run on an H100 (2026-12-06) printed it each step."""
    import warnings

    recipe = {**RECIPE, "train_type": train_type, "gradient_checkpointing": True, "max_steps": 2, "logging_steps": 1}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(str(tiny_model), [str(tiny_data)], recipe, str(tmp_path / "adapter"), str(tmp_path / "ckpt"))
    assert not [str(w.message) for w in caught if "use_reentrant" in str(w.message)]
