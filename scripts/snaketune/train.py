"""Step `train`: pre-training (``pt``) or supervised fine-tuning (``sft``) of a causal LM.

Reads top to bottom: load the base model and tokenizer, tokenize the dataset (``sft``: loss on
assistant turns only; ``pt``: loss on every token; cached by content hash), wrap the model for
the recipe's ``train_type`` (``full``, ``freeze`` = full on chosen modules/last layers, or a LoRA
variant through peft, ``qlora`` on a bitsandbytes 4/8-bit base), train with
``transformers.Trainer`` (DDP, FSDP2 or DeepSpeed ZeRO when launched on several processes) and
save an HF model folder (full/freeze) or a PEFT adapter folder (LoRA family) atomically.

Checkpoints go to ``--checkpoints``; a rerun resumes from the newest complete one. SIGTERM or
SIGUSR1 (what Slurm sends before preemption or the time limit) saves a checkpoint and exits with
code 75 so the scheduler can requeue the job.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from snaketune import kernels, vision
from snaketune.atomic import atomic_dir, write_json
from snaketune.errors import SnaketuneError, cli
from snaketune.files import read_jsonl, record_names, sha256_file
from snaketune.schema import resolve
from snaketune.training import (Preempted, drop_checkpoints, keep_initial_adapter, load_model, make_callback,
                                parameter_counts, run_record, run_trainer, save, saved_dtype, start,
                                step_parser, total_steps, tracking_resume,
                                trainer_args, wrap_model)

LABELS_VERSION = 3  # of tokenize_sft's label policy; part of the tokenized-cache key


def turn_separator(tokenizer, **kw) -> str:
    """The whitespace the chat template puts after a turn's end-of-turn marker (ChatML: a newline),
    read from a rendered user turn."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "\u2126"}], tokenize=False, **kw)
    tail = text[text.rindex("\u2126") + 1:]
    return tail[len(tail.rstrip()):]


def tokenize_sft(messages: list[dict], tokenizer, max_length: int, system: str | None = None,
                 tools: list[dict] | None = None, label_separator: bool = True) -> dict:
    """Tokenize one conversation with the chat template; labels only on assistant turns.

    Every assistant turn (content or tool calls, its end-of-turn marker and, with
    ``label_separator``, the separator after the marker: ChatML's newline) is supervised; system,
    user and tool turns and the template's role headers are masked with -100. A template that
    renders no separator after the conversation's last turn gets the one it puts after a user
    turn's marker, as ms-swift's templates end every turn (docs/parity.md: labelling it took the
    parity study's full SFT from 0.46 to 0.94 held-out). ``system`` is prepended as the system
    prompt to conversations that have none; ``tools`` (the row's function schemas) go to the
    template as they are.
    """
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    kw = {"tools": tools} if tools else {}
    text = tokenizer.apply_chat_template(messages, tokenize=False, **kw)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True, **kw))
        turn = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False, **kw)
        spans.append((start, len(turn) if label_separator else len(turn.rstrip())))
    if label_separator and messages[-1]["role"] == "assistant" and text == text.rstrip():
        text += turn_separator(tokenizer, **kw)
        spans[-1] = (spans[-1][0], len(text))
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


def tokenize_dataset(data_dirs: list[Path], stage: str, tokenizer, max_length: int, policy: str,
                     system: str | None = None, images: vision.Images | None = None, split: str | None = None,
                     label_separator: bool = True):
    """Tokenize the stage's split of every dataset folder (a mix is concatenated; the trainer
    shuffles with the seed); apply the ``truncate``/``drop`` policy; returns (rows, stats).
    With ``images`` (a vision-language model's image processor) rows keep their image files.
    ``split`` names another file of the folders (the held-out ``HELD_OUT[stage]``);
    ``label_separator``: see tokenize_sft."""
    split = split or ("pretrain" if stage == "pt" else "train")
    rows = []
    for data_dir in map(Path, data_dirs):
        for r in read_jsonl(data_dir / f"{split}.jsonl"):
            if stage == "pt":
                rows.append(tokenize_pt(r["text"], tokenizer, max_length))
            elif images:
                rows.append(vision.tokenize_row(r, data_dir, tokenizer, images, max_length, system, label_separator))
            else:
                rows.append(tokenize_sft(r["messages"], tokenizer, max_length, system, r.get("tools"), label_separator))
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
        raise SnaketuneError(f"no trainable samples in {split}.jsonl of {', '.join(map(str, data_dirs))} for "
                             f"stage {stage!r}: check max_length, that rows have assistant turns, and that "
                             "pt datasets have text rows (format: text)")
    return kept, stats


def cache_key(data_dirs: list[Path], stage: str, base: str, tokenizer, recipe: dict, split: str | None = None) -> str:
    """Content hash of everything tokenization depends on: data, tokenizer, template, length policy."""
    split = split or ("pretrain" if stage == "pt" else "train")
    parts = {
        "data": [sha256_file(Path(d) / f"{split}.jsonl") for d in data_dirs],
        "tokenizer": {f.name: sha256_file(f) for f in sorted(Path(base).glob("tokenizer*"))},
        "template": tokenizer.chat_template,
        "stage": stage,
        "max_length": recipe["max_length"],
        "truncation": recipe["truncation"],
        "system": recipe.get("system"),
        "label_separator": recipe["label_separator"],
        "labels": LABELS_VERSION,
    }
    if (Path(base) / "preprocessor_config.json").is_file():  # a vision-language model: image token counts
        parts["image_processor"] = sha256_file(Path(base) / "preprocessor_config.json")
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def tokenized(data_dirs: list[str], stage: str, base: str, tokenizer, recipe: dict, cache_dir: str | None,
              images: vision.Images | None = None, split: str | None = None):
    """Tokenized rows and stats, from ``cache_dir/<content hash>`` when an earlier run made them."""
    from datasets import Dataset, load_from_disk

    args = ([Path(d) for d in data_dirs], stage, tokenizer, recipe["max_length"],
            recipe["truncation"], recipe.get("system"), images, split, recipe["label_separator"])
    if not cache_dir:
        rows, stats = tokenize_dataset(*args)
        return Dataset.from_list(rows), stats
    folder = Path(cache_dir) / cache_key(args[0], stage, base, tokenizer, recipe, split)
    if (folder / "stats.json").is_file():
        print(f"tokenized data from cache {folder}", flush=True)
        return load_from_disk(str(folder / "rows")), json.loads((folder / "stats.json").read_text())
    rows, stats = tokenize_dataset(*args)
    dataset = Dataset.from_list(rows)
    with atomic_dir(folder) as tmp:
        dataset.save_to_disk(str(tmp / "rows"))
        write_json(tmp / "stats.json", stats)
    return load_from_disk(str(folder / "rows")), stats


HELD_OUT = {"sft": "test", "pt": "pretrain_test"}  # the data step's held-out file of each stage's rows


def held_out(data_dirs: list[str], stage: str, base: str, tokenizer, recipe: dict, cache_dir: str | None,
             images: vision.Images | None = None):
    """The rows ``eval_steps`` evaluates the loss on: the data step's held-out split of each
    dataset (``test.jsonl``; ``pretrain_test.jsonl`` for pt), never trained on. Benches that score
    ``split: test`` read the same rows; the loss is only observed (no early stopping, no choice of
    checkpoint), so the trained weights and the bench's score do not depend on it."""
    split = HELD_OUT[stage]
    empty = [d for d in data_dirs if not (Path(d) / f"{split}.jsonl").is_file()
             or not (Path(d) / f"{split}.jsonl").read_text(encoding="utf-8").strip()]
    if empty:
        raise SnaketuneError(f"eval_steps: the held-out split ({split}.jsonl) of {', '.join(map(str, empty))} is empty: "
                             "give those datasets a test_size above 0 or a test_path, or drop eval_steps from the recipe")
    dataset, stats = tokenized(data_dirs, stage, base, tokenizer, recipe, cache_dir, images, split)
    print(f"held-out data for eval_steps ({split}.jsonl): {len(dataset)} samples, {stats['tokens']:,} tokens", flush=True)
    return dataset


def prepare_model(model, recipe: dict, cuda: bool):
    """Make a loaded model ready to train: activation checkpointing, the train_type's wrapping
    (full/freeze/LoRA family) and the speed-ups the recipe asks for. The speed benchmark calls
    this same function."""
    if recipe["gradient_checkpointing"] and recipe.get("train_type") != "qlora":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = wrap_model(model, recipe)
    speedups = kernels.resolve_options(recipe, cuda)
    if any(speedups.get(k) for k in kernels.OPTION_KEYS):
        model = kernels.apply_speedups(model, speedups)
    return model


LOSS_TOTAL = "loss_total.json"  # in each checkpoint: the loss sums of every step so far


def trainer_class():
    """transformers.Trainer that counts the tokens of a padding-free batch (no attention_mask: the
    packed collator's) from its shape on one process; transformers reads a device tensor back
    for it every step, a host sync that leaves the GPU idle while the next step is set up.

    It also keeps ``train_loss`` right across a resume: transformers sums the loss of the steps of
    this session only and divides by every step (a run resumed at step 20 of 40 reported about half
    its loss), so each checkpoint stores the sum so far and a resume starts from it."""
    import torch
    from transformers import Trainer
    from transformers.trainer_pt_utils import nested_gather

    class SnaketuneTrainer(Trainer):
        def _save_checkpoint(self, model, trial):
            super()._save_checkpoint(model, trial)
            pending = nested_gather(self._tr_loss, self.args.parallel_mode).mean().item()
            if self.args.should_save:
                folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
                write_json(folder / LOSS_TOTAL, {"step": self.state.global_step, "logged": self._total_loss_scalar,
                                                 "pending": pending, "last_logged": self._globalstep_last_logged})

        def _load_rng_state(self, checkpoint):
            super()._load_rng_state(checkpoint)  # called once, when training resumes from checkpoint
            saved = Path(checkpoint) / LOSS_TOTAL if checkpoint else None
            if saved and saved.is_file():  # the loss sums as they were: the next log covers the same steps
                record = json.loads(saved.read_text())
                self._total_loss_scalar = record["logged"]
                self._tr_loss += record["pending"]
                self._globalstep_last_logged = record["last_logged"]

        def _track_num_input_tokens(self, inputs):
            ids = inputs.get("input_ids")
            if (self.args.include_num_input_tokens_seen != "no" and self.args.world_size == 1
                    and torch.is_tensor(ids) and "attention_mask" not in inputs):
                self.state.num_input_tokens_seen += ids.numel()
                return
            super()._track_num_input_tokens(inputs)

    return SnaketuneTrainer


def train(base: str, data: list[str], recipe: dict, out: str, checkpoints: str | None = None, run=None,
          cache_dir: str | None = None, model_name: str | None = None, variant: str | None = None) -> dict:
    """Train ``base`` on ``data`` with ``recipe``; write the adapter/model folder ``out``
    (training.json names ``model_name`` and ``variant``, the recipe, as the workflow does).

    Returns the summary written to ``out/training.json``. Under torchrun every rank calls this;
    rank 0 writes the output.
    """
    import torch
    from transformers import DataCollatorForSeq2Seq, TrainingArguments

    from snaketune.tracking import NullRun

    setup = start(base, data, recipe, out, checkpoints)
    recipe, tokenizer, cuda = setup.recipe, setup.tokenizer, setup.cuda
    stage, train_type = recipe.get("stage", "sft"), recipe.get("train_type", "lora")
    images = vision.Images(base) if stage == "sft" and vision.check_model(
        base, [Path(d) / "train.jsonl" for d in data]) else None
    dataset, data_stats = tokenized(data, stage, base, tokenizer, recipe, cache_dir, images)
    print(f"data: {data_stats['samples']} samples, {data_stats['tokens']:,} tokens, "
          f"{data_stats['truncated']} truncated, {data_stats['dropped']} dropped", flush=True)
    eval_dataset = held_out(data, stage, base, tokenizer, recipe, cache_dir, images) if recipe.get("eval_steps") else None

    torch.manual_seed(recipe.get("seed", 0))  # the workflow passes the study seed
    model = prepare_model(load_model(base, recipe, setup.dtype, cuda), recipe, cuda)
    initial_adapter = keep_initial_adapter(model, recipe, setup.checkpoints)
    speedups = kernels.resolve_options(recipe, cuda)
    if images:
        collator = (vision.PackedCollator(images, kernels.causal_lm(model).model.get_rope_index)
                    if speedups.get("packing") else vision.Collator(images, tokenizer.pad_token_id))
    elif speedups.get("packing"):
        collator = kernels.PackedCollator(tokenizer.pad_token_id)
    else:
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

    steps = total_steps(recipe, len(dataset), setup.world)
    # logging_nan_inf_filter=False: the filter reads the loss back every step (a host sync that
    # idles the GPU); a NaN loss is logged as NaN instead of being replaced by the running mean
    args = TrainingArguments(**trainer_args(recipe, setup.checkpoints, cuda, setup.dtype_name, steps),
                             remove_unused_columns=False, logging_nan_inf_filter=False)
    preempted = Preempted()
    progress = make_callback(run or NullRun(), preempted, steps)
    trainer = trainer_class()(
        model=model,
        args=args,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        callbacks=[progress],
    )
    trainable, total = parameter_counts(model)
    on = ", ".join(k for k in kernels.OPTION_KEYS if speedups.get(k)) or "none"
    result, resume, seconds = run_trainer(
        trainer, setup.checkpoints, preempted, cuda,
        f"training {stage}/{train_type}: {trainable:,} of {total:,} parameters trainable, {steps} steps, "
        f"batch {recipe['batch_size']}x{recipe['gradient_accumulation_steps']}x{setup.world}, {setup.dtype_name}, "
        f"speed-ups: {on}", recipe, variant)

    eval_losses = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    summary = {
        **record_names(model_name, variant),
        "stage": stage,
        "train_type": train_type,
        **run_record(trainer, result, resume, seconds, progress, cuda, setup.dtype_name),
        "eval_loss": eval_losses[-1] if eval_losses else None,  # the last held-out loss (eval_steps)
        "world_size": setup.world,
        "speedups": {k: speedups.get(k) for k in kernels.OPTION_KEYS},
        "base_quantization": resolve("recipes.quantization", recipe.get("quantization", {}))
        if train_type == "qlora" else None,
        "data": data_stats,
    }
    save(trainer, tokenizer, summary, Path(out), initial_adapter, saved_dtype(base, recipe),
         images.processor if images else None)
    drop_checkpoints(trainer, setup.checkpoints, recipe)
    return summary


@cli
def main(argv=None):
    ap = step_parser("python -m snaketune.train", __doc__, "tokenized-data cache folder (default: no cache)")
    args = ap.parse_args(argv)
    recipe = resolve("recipes", json.loads(args.params))
    from snaketune.tracking import step_run

    with step_run("train", recipe, tracking_resume(args.out, args.checkpoints, recipe, [args.base, *args.data])) as run:
        s = train(args.base, args.data, recipe, args.out, args.checkpoints, run, args.cache_dir, args.model_name,
                  args.variant)
        run.log_metrics({k: s[k] for k in ("train_loss", "tokens_per_s", "wall_seconds", "warmup_seconds", "steps",
                                           "trainable_params", "gpu_peak_gib") if s[k] is not None})
        run.log_artifact(Path(args.out) / "training.json")
    rate = f"{s['tokens_per_s']:,.0f} tok/s after {s['warmup_steps']} warm-up steps ({s['warmup_seconds']:.0f} s)" \
        if s["tokens_per_s"] else "tokens/s not measured"
    print(f"trained {s['stage']}/{s['train_type']}: {s['steps']} steps in {s['wall_seconds']:.0f} s, "
          f"loss {s['first_loss']:.3f} -> {s['final_loss']:.3f}, {rate} -> {args.out}")


if __name__ == "__main__":
    main()
