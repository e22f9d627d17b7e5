"""Step `train`: pre-training (``pt``) or supervised fine-tuning (``sft``) of a causal LM.

Reads top to bottom: load the base model and tokenizer, tokenize the dataset (``sft``: loss on
assistant turns only; ``pt``: loss on every token), wrap the model for the recipe's
``train_type`` (``full`` or a LoRA variant through peft), train with ``transformers.Trainer``
and save an HF model folder (full) or a PEFT adapter folder (LoRA family) atomically.

Checkpoints go to ``--checkpoints``; a rerun resumes from the newest complete one. SIGTERM or
SIGUSR1 (what Slurm sends before preemption or the time limit) saves a checkpoint and exits with
code 75 so the scheduler can requeue the job.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

from snaketune.atomic import atomic_dir, write_json
from snaketune.errors import SnaketuneError, cli

LORA_TYPES = ("lora", "dora", "rslora", "pissa", "olora")
EXIT_REQUEUE = 75  # EX_TEMPFAIL: checkpoint written, rerun to resume


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def tokenize_sft(messages: list[dict], tokenizer, max_length: int) -> dict:
    """Tokenize one conversation with the chat template; labels only on assistant turns.

    Every assistant turn (content and end-of-turn marker) is supervised; system, user and tool
    turns and the template's role headers are masked with -100.
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
        end = len(tokenizer.apply_chat_template(messages[: i + 1], tokenize=False))
        spans.append((start, end))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [
        tok if any(s <= a < e for s, e in spans) else -100
        for tok, (a, _) in zip(enc["input_ids"], enc["offset_mapping"])
    ]
    return {"input_ids": enc["input_ids"][:max_length], "labels": labels[:max_length],
            "truncated": len(enc["input_ids"]) > max_length}


def tokenize_pt(text: str, tokenizer, max_length: int) -> dict:
    """Tokenize raw text for pre-training: every token (and the final EOS) is a label."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {"input_ids": ids[:max_length], "labels": ids[:max_length], "truncated": len(ids) > max_length}


def tokenize_dataset(data_dirs: list[Path], stage: str, tokenizer, max_length: int, policy: str):
    """Tokenize the stage's split of every dataset folder (a mix is concatenated; the trainer
    shuffles with the seed); apply the ``truncate``/``drop`` policy; returns (rows, stats)."""
    rows = []
    for data_dir in map(Path, data_dirs):
        if stage == "pt":
            rows += [tokenize_pt(r["text"], tokenizer, max_length) for r in read_jsonl(data_dir / "pretrain.jsonl")]
        else:
            rows += [tokenize_sft(r["messages"], tokenizer, max_length) for r in read_jsonl(data_dir / "train.jsonl")]
    cut = [r.pop("truncated") for r in rows]
    if policy == "drop":
        kept = [r for r, c in zip(rows, cut) if not c]
    elif policy == "truncate":
        kept = rows
    else:
        raise SnaketuneError(f"unknown truncation policy {policy!r}: use truncate or drop")
    kept = [r for r in kept if any(label != -100 for label in r["labels"])]
    for r in kept:
        r["attention_mask"] = [1] * len(r["input_ids"])
    stats = {"samples": len(rows), "truncated": sum(cut), "dropped": len(rows) - len(kept),
             "tokens": sum(len(r["input_ids"]) for r in kept)}
    if not kept:
        raise SnaketuneError(f"no trainable samples in {', '.join(map(str, data_dirs))} for stage {stage!r}: "
                             "check max_length and that rows have assistant turns")
    return kept, stats


def pick_dtype(recipe: dict, cuda: bool):
    import torch

    name = recipe.get("dtype", "auto")
    if name == "auto":
        name = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    return name, {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def wrap_model(model, recipe: dict):
    """Apply the recipe's train_type: full fine-tuning, or a peft LoRA variant."""
    train_type = recipe.get("train_type", "lora")
    if train_type == "full":
        return model
    if train_type not in LORA_TYPES:
        raise SnaketuneError(f"unknown train_type {train_type!r}: use full or one of {', '.join(LORA_TYPES)}")
    from peft import LoraConfig, get_peft_model

    lora = recipe.get("lora", {})
    config = LoraConfig(
        r=lora.get("r", 8),
        lora_alpha=lora.get("alpha", 32),
        lora_dropout=lora.get("dropout", 0.0),
        target_modules=lora.get("target_modules", "all-linear"),
        modules_to_save=lora.get("modules_to_save"),
        use_dora=train_type == "dora",
        use_rslora=train_type == "rslora",
        init_lora_weights={"pissa": "pissa", "olora": "olora"}.get(train_type, True),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


class Preempted:
    """Flag set by SIGTERM/SIGUSR1; the training callback turns it into save-and-stop."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        self.signal = signal.Signals(signum).name
        print(f"received {self.signal}: saving a checkpoint and stopping", file=sys.stderr, flush=True)


def make_callback(run, preempted: Preempted, total_steps: int):
    """A TrainerCallback that logs to MLflow, prints progress lines and handles preemption."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def __init__(self):
            self.t0 = time.time()
            self.start_step = None
            self.tokens0 = 0

        def on_train_begin(self, args, state, control, **kw):
            self.start_step = state.global_step
            self.tokens0 = state.num_input_tokens_seen
            self.t0 = time.time()

        def on_step_end(self, args, state, control, **kw):
            if preempted.signal:
                control.should_save = True
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kw):
            logs = dict(logs or {})
            elapsed = max(time.time() - self.t0, 1e-9)
            done = state.global_step - (self.start_step or 0)
            tps = (state.num_input_tokens_seen - self.tokens0) / elapsed
            logs["tokens_per_s"] = tps
            run.log_metrics({k: v for k, v in logs.items() if k != "epoch"}, step=state.global_step)
            if "loss" in logs:
                eta = (total_steps - state.global_step) * elapsed / max(done, 1)
                print(f"step {state.global_step}/{total_steps} | loss {logs['loss']:.4f} | "
                      f"lr {logs.get('learning_rate', 0):.2e} | {tps:,.0f} tok/s | "
                      f"ETA {eta / 60:.1f} min", flush=True)

    return Progress()


def latest_checkpoint(folder: Path) -> str | None:
    """The newest complete Trainer checkpoint under ``folder`` (has trainer_state.json)."""
    if not folder.is_dir():
        return None
    done = [p for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return str(max(done, key=lambda p: int(p.name.split("-")[1]))) if done else None


def train(base: str, data: list[str], recipe: dict, out: str, checkpoints: str | None = None, run=None) -> dict:
    """Train ``base`` on ``data`` with ``recipe``; write the adapter/model folder ``out``.

    Returns the summary written to ``out/training.json``.
    """
    import torch
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainingArguments)

    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(recipe.get("threads", 1))
    dtype_name, dtype = pick_dtype(recipe, cuda)
    stage = recipe.get("stage", "sft")
    seed = recipe.get("seed", 0)
    checkpoints = Path(checkpoints or Path(out).with_name(Path(out).name + ".checkpoints"))

    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows, data_stats = tokenize_dataset(data, stage, tokenizer, recipe.get("max_length", 2048),
                                        recipe.get("truncation", "truncate"))
    print(f"data: {data_stats['samples']} samples, {data_stats['tokens']:,} tokens, "
          f"{data_stats['truncated']} truncated, {data_stats['dropped']} dropped", flush=True)

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    if recipe.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = wrap_model(model, recipe)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    batch = recipe.get("batch_size", 8)
    accum = recipe.get("gradient_accumulation_steps", 1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    steps_per_epoch = math.ceil(len(rows) / (batch * accum * world))
    total_steps = recipe.get("max_steps") or steps_per_epoch * recipe.get("epochs", 1)
    args = TrainingArguments(
        output_dir=str(checkpoints),
        max_steps=total_steps,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum,
        learning_rate=recipe.get("learning_rate", 1e-4),
        lr_scheduler_type=recipe.get("lr_scheduler", "cosine"),
        warmup_steps=recipe.get("warmup_ratio", 0.0),
        weight_decay=recipe.get("weight_decay", 0.0),
        max_grad_norm=recipe.get("max_grad_norm", 1.0),
        logging_steps=recipe.get("logging_steps", 10),
        save_strategy="steps",
        save_steps=recipe.get("save_steps", 200),
        save_total_limit=2,
        seed=seed,
        data_seed=seed,
        full_determinism=not cuda or recipe.get("deterministic", False),
        bf16=dtype_name == "bf16",
        fp16=dtype_name == "fp16",
        use_cpu=not cuda,
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    from datasets import Dataset

    preempted = Preempted()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        callbacks=[make_callback(run, preempted, total_steps)],
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the progress callback prints instead
    resume = latest_checkpoint(checkpoints)
    if resume:
        print(f"resuming from {resume}", flush=True)
    print(f"training {stage}/{recipe.get('train_type', 'lora')}: {trainable:,} of {total:,} parameters "
          f"trainable, {total_steps} steps, batch {batch}x{accum}x{world}, {dtype_name}", flush=True)
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    if preempted.signal:
        print(f"stopped by {preempted.signal} at step {trainer.state.global_step}; checkpoint in "
              f"{checkpoints}; rerun to resume", file=sys.stderr, flush=True)
        sys.exit(EXIT_REQUEUE)

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    summary = {
        "stage": stage,
        "train_type": recipe.get("train_type", "lora"),
        "steps": trainer.state.global_step,
        "resumed_from": resume,
        "train_loss": result.training_loss,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "tokens": trainer.state.num_input_tokens_seen,
        "seconds": time.time() - t0,
        "tokens_per_s": trainer.state.num_input_tokens_seen / max(time.time() - t0, 1e-9),
        "trainable_params": trainable,
        "total_params": total,
        "dtype": dtype_name,
        "data": data_stats,
        "log_history": trainer.state.log_history,
    }
    if trainer.is_world_process_zero():
        with atomic_dir(out) as tmp:
            trainer.model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            write_json(Path(tmp) / "training.json", summary)
    return summary


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m snaketune.train", description=__doc__)
    ap.add_argument("--base", required=True, help="HF model folder to start from")
    ap.add_argument("--data", required=True, nargs="+", help="dataset folder(s) from the data step")
    ap.add_argument("--params", required=True, help="JSON: the recipes.<name> block of the config")
    ap.add_argument("--out", required=True, help="output adapter (LoRA family) or model (full) folder")
    ap.add_argument("--checkpoints", help="checkpoint folder (default: <out>.checkpoints)")
    args = ap.parse_args(argv)
    recipe = json.loads(args.params)
    from snaketune.tracking import step_run

    with step_run("train", recipe) as run:
        s = train(args.base, args.data, recipe, args.out, args.checkpoints, run)
        run.log_metrics({k: s[k] for k in ("train_loss", "tokens_per_s", "seconds", "steps", "trainable_params")})
        run.log_artifact(Path(args.out) / "training.json")
    print(f"trained {s['stage']}/{s['train_type']}: {s['steps']} steps in {s['seconds']:.0f} s, "
          f"loss {s['first_loss']:.3f} -> {s['final_loss']:.3f}, {s['tokens_per_s']:,.0f} tok/s -> {args.out}")


if __name__ == "__main__":
    main()
