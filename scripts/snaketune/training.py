"""What the train and align steps share: the run's setup (dtype, checkpoints claimed for these
inputs, tokenizer), the model (loading, quantized bases, the train type's wrapping), the Trainer's
arguments, progress and preemption, and the tail every run ends with (``run_trainer``: resume from
the newest complete checkpoint, train, exit 75 on a preemption signal, advice when the GPU runs out
of memory; ``run_record``: what training.json records of any run; ``save``: the output folder,
atomically).

A library, not a step: ``snaketune.train`` (pt, sft) and ``snaketune.align`` (dpo, ..., grpo)
read top to bottom and call into it.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import json
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from snaketune import vision
from snaketune.atomic import write_json
from snaketune.errors import SnaketuneError
from snaketune.registry import FULL_TYPES, LORA_TYPES
from snaketune.schema import block_schema, resolve

BASE_REWRITING = ("pissa", "olora")  # their init rewrites the base weights (see keep_initial_adapter)
EXIT_REQUEUE = 75  # EX_TEMPFAIL: checkpoint written, rerun to resume
WARMUP_STEPS = 3  # steps left out of the steady-state rate: compile, recompiles, allocator and optimizer set-up
MLFLOW_RUN = "mlflow_run.json"  # in the checkpoint folder: the MLflow run that a resume continues


def pick_dtype(recipe: dict, cuda: bool):
    import torch

    name = recipe["dtype"]
    if name == "auto":
        name = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    return name, {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def qlora_config(q: dict, dtype, vision: bool = False):
    """bitsandbytes settings of a QLoRA base from the recipe's ``quantization`` block (as
    training.json records it in ``base_quantization``), its keys unset taking the schema's defaults
    (4-bit NF4 with double quantization). ``vision``: a vision-language model, whose vision tower
    and merger (and LM head) stay unquantized."""
    from transformers import BitsAndBytesConfig

    q = resolve("recipes.quantization", q)
    return BitsAndBytesConfig(
        load_in_4bit=q["bits"] == 4, load_in_8bit=q["bits"] == 8, bnb_4bit_quant_type=q["quant_type"],
        bnb_4bit_use_double_quant=q["double_quant"], bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=["model.visual", "lm_head"] if vision else None)


def saved_dtype(base: str, recipe: dict) -> str | None:
    """The dtype a trained full model is cast to when saved: its base's, if it trained on fp32
    master weights from a bf16/fp16 base; None (saved as trained) otherwise."""
    if recipe.get("train_type") in FULL_TYPES and recipe["master_weights"] == "fp32":
        declared = base_dtype(base)
        return declared if declared in ("bfloat16", "float16") else None
    return None


def load_model(base: str, recipe: dict, dtype, cuda: bool):
    """Load the base model: for full/freeze fp32 master weights (``master_weights: fp32``) or
    weights in ``dtype`` (``master_weights: dtype``, pure bf16 as torchtune does), the frozen base
    in ``dtype`` for the LoRA family, or 4/8-bit through bitsandbytes for ``qlora``. A
    vision-language model loads whole (vision tower, merger, language model)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForImageTextToText if vision.is_vision(base) else AutoModelForCausalLM
    if recipe.get("train_type") in FULL_TYPES and recipe["master_weights"] == "fp32":
        # trained weights stay fp32; bf16/fp16 runs compute under autocast. Pure-bf16 weights lose
        # AdamW updates smaller than bf16's precision (benchmarks/NOTES.md, strategies run).
        import torch

        return auto.from_pretrained(base, dtype=torch.float32)
    if recipe.get("train_type") != "qlora":
        return auto.from_pretrained(base, dtype=dtype)
    from peft import prepare_model_for_kbit_training

    device_map = {"": int(os.environ.get("LOCAL_RANK", 0))} if cuda else None
    model = auto.from_pretrained(base, dtype=dtype, device_map=device_map,
                                 quantization_config=qlora_config(recipe.get("quantization", {}), dtype,
                                                                  vision.is_vision(base)))
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe["gradient_checkpointing"],
                                           gradient_checkpointing_kwargs={"use_reentrant": False})


def decoder_layers(model):
    """The list of transformer blocks of an HF causal LM."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise SnaketuneError(f"cannot find the decoder layers of {type(model).__name__} for freeze.trainable_layers")
    return layers


def freeze(model, spec: dict):
    """Train only the last ``trainable_layers`` blocks and the modules matching ``trainable_modules``."""
    patterns = [re.compile(p) for p in spec.get("trainable_modules", [])]
    for name, param in model.named_parameters():
        param.requires_grad = any(p.search(name) for p in patterns)
    n = spec.get("trainable_layers", 0)
    layers = decoder_layers(model)
    for layer in list(layers)[len(layers) - n:] if n else []:
        for param in layer.parameters():
            param.requires_grad = True
    if not any(p.requires_grad for p in model.parameters()):
        raise SnaketuneError("freeze leaves nothing to train: set freeze.trainable_layers (the last N blocks) "
                             "or freeze.trainable_modules (regexes over parameter names, e.g. 'mlp', 'lm_head')")
    return model


def wrap_model(model, recipe: dict):
    """Apply the recipe's train_type: full, freeze, or a peft LoRA variant."""
    train_type = recipe.get("train_type", "lora")
    vl = getattr(model.config, "vision_config", None) is not None
    if train_type == "full":
        return vision.freeze_parts(model, recipe) if vl else model
    if train_type == "freeze":
        return freeze(model, recipe.get("freeze", {}))
    if train_type not in LORA_TYPES:
        raise SnaketuneError(f"unknown train_type {train_type!r}: use one of {', '.join(FULL_TYPES + LORA_TYPES)}")
    from peft import LoraConfig, get_peft_model

    lora = recipe["lora"]
    config = LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=vision.lora_targets(model, recipe) if vl and lora["target_modules"] == "all-linear"
        else lora["target_modules"],
        modules_to_save=lora.get("modules_to_save"),
        use_dora=train_type == "dora",
        use_rslora=train_type == "rslora",
        init_lora_weights={"pissa": "pissa", "olora": "olora"}.get(train_type, True),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def keep_initial_adapter(model, recipe: dict, checkpoints: Path) -> Path | None:
    """PiSSA/OLoRA move the adapter's part of each weight out of the base at init, so their adapter
    fits only that rewritten base. Keep the initial adapter (once, beside the checkpoints) so that
    ``save`` can convert the trained one into a plain LoRA on the original base (peft's weight
    conversion). None for the other train types."""
    if recipe.get("train_type") not in BASE_REWRITING:
        return None
    if sharded(recipe):
        raise SnaketuneError(f"train_type {recipe['train_type']} cannot be saved as a plain LoRA from FSDP/DeepSpeed "
                             "shards: use distributed.strategy ddp (or none), or train_type lora")
    folder = checkpoints / "initial-adapter"
    if int(os.environ.get("RANK", "0")) == 0 and not folder.exists():
        config = model.peft_config["default"]
        init, config.init_lora_weights = config.init_lora_weights, True  # reload it as saved, no re-init
        partial = folder.with_name(".initial-adapter.partial")
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(partial)
        config.init_lora_weights = init
        os.replace(partial, folder)
    return folder


def sharded(recipe: dict) -> bool:
    """Whether the recipe shards the model over processes (FSDP2 or DeepSpeed)."""
    return recipe["distributed"]["strategy"] in ("fsdp", "deepspeed")


def optimizer(recipe: dict, cuda: bool) -> str:
    """The recipe's ``optim`` as a transformers optimizer name (auto: fused AdamW on GPU)."""
    name = recipe["optim"]
    if name == "auto":
        return "adamw_torch_fused" if cuda else "adamw_torch"
    return name


def freeze_heap() -> None:
    """Put every object alive before training into the garbage collector's permanent generation.

    The Trainer starts ``train()`` with a full ``gc.collect()`` (accelerate's ``free_memory``), and
    the collector's full passes during training walk the whole heap: with torch, transformers, trl,
    datasets and MLflow imported that took 0.44 s per run of the parity study's 50 DPO steps.
    Frozen objects are never collected; what is freed later is collected as usual.
    """
    import gc

    gc.freeze()


def trainer_args(recipe: dict, checkpoints: Path, cuda: bool, dtype_name: str, total_steps: int) -> dict:
    """TrainingArguments keywords from a recipe (shared by train and align): optimiser, schedule,
    checkpoints, seeds, precision, and the multi-process strategy when there is one."""
    seed = recipe.get("seed", 0)
    args = dict(
        output_dir=str(checkpoints),
        max_steps=total_steps,
        per_device_train_batch_size=recipe["batch_size"],
        gradient_accumulation_steps=recipe["gradient_accumulation_steps"],
        learning_rate=recipe["learning_rate"],  # its default is the schema's
        lr_scheduler_type=recipe["lr_scheduler"],
        warmup_steps=recipe["warmup_ratio"],  # a float < 1 is a ratio (transformers 5)
        weight_decay=recipe["weight_decay"],
        max_grad_norm=recipe["max_grad_norm"],
        logging_steps=recipe["logging_steps"],
        save_strategy="steps",
        save_steps=recipe["save_steps"],
        save_total_limit=2,
        seed=seed,
        data_seed=seed,
        full_determinism=not cuda or recipe["deterministic"],
        bf16=dtype_name == "bf16",
        fp16=dtype_name == "fp16",
        use_cpu=not cuda,
        optim=optimizer(recipe, cuda),
        adam_beta1=recipe["adam_beta1"],
        adam_beta2=recipe["adam_beta2"],
        adam_epsilon=recipe["adam_epsilon"],
        include_num_input_tokens_seen="non_padding",
        **({"eval_strategy": "steps", "eval_steps": recipe["eval_steps"], "prediction_loss_only": True,
            "per_device_eval_batch_size": recipe["batch_size"]} if recipe.get("eval_steps") else {}),
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        # pinned batches copied without blocking: a blocking copy waits for the previous step's
        # kernels, so the GPU then idles while the next batch is collated and the step launched
        **({"accelerator_config": {"non_blocking": True}, "dataloader_pin_memory": True} if cuda else {}),
    )
    if sharded(recipe) or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        args.update(distributed_args(recipe, cuda))
    return args


def distributed_args(recipe: dict, cuda: bool) -> dict:
    """TrainingArguments for the recipe's multi-process strategy: ddp, fsdp (FSDP2) or deepspeed."""
    dist = recipe["distributed"]
    strategy = dist["strategy"]
    args = {"ddp_backend": "nccl" if cuda else "gloo", "ddp_find_unused_parameters": False}
    if strategy == "fsdp":
        args["fsdp"] = True
        args["fsdp_config"] = {"version": 2, "reshard_after_forward": True, "cpu_offload": dist["offload"],
                               "activation_checkpointing": recipe["gradient_checkpointing"],
                               "state_dict_type": "FULL_STATE_DICT", "cpu_ram_efficient_loading": False}
    elif strategy == "deepspeed":
        stage = dist["zero_stage"]
        zero = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
                "stage3_gather_16bit_weights_on_model_save": True}
        if dist["offload"]:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
            if stage == 3:
                zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        args["deepspeed"] = {"zero_optimization": zero, "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
                             "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
                             "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}
    elif strategy != "ddp":
        raise SnaketuneError(f"unknown distributed.strategy {strategy!r}: use ddp, fsdp or deepspeed")
    return args


class Preempted:
    """Flag set by SIGTERM/SIGUSR1; the training callback turns it into save-and-stop."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        self.signal = signal.Signals(signum).name
        print(f"received {self.signal}: saving a checkpoint and stopping", file=sys.stderr, flush=True)


def _sync() -> None:
    """Wait for queued GPU work, so that a host clock read after it marks the end of that work."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def make_callback(run, preempted: Preempted, total_steps: int):
    """A TrainerCallback that logs to MLflow, prints progress lines, handles preemption and times
    the run (its ``timing()`` goes into training.json).

    Steady state runs from the end of step ``k0`` (``WARMUP_STEPS`` after the first step of this
    session, fewer when the session has at most twice as many steps) to the end of the last
    step, each end read after a device synchronisation; the final checkpoint and model save come
    after it. Tokens are the Trainer's ``state.num_input_tokens_seen`` (non-padding, kept across a resume).
    Each log sends MLflow ``interval_tokens_per_s``, the rate since the previous log (logging reads
    the loss, which waits for the device); the step logs the steady ``tokens_per_s`` at the end.
    """
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def __init__(self):
            self.t0 = time.perf_counter()
            self.start_step = None
            self.k0 = 0
            self.marks = {}  # "begin" / "warm" / "end" -> (step, tokens, perf_counter)
            self.last_log = None
            self.eval_seconds = 0.0  # held-out evaluations inside the steady-state window

        def _mark(self, name, state):
            _sync()
            self.marks[name] = (state.global_step, state.num_input_tokens_seen, time.perf_counter())

        def on_train_begin(self, args, state, control, **kw):
            self.start_step = state.global_step
            self.k0 = min(WARMUP_STEPS, max(state.max_steps - state.global_step, 0) // 2)
            self.marks = {}
            self.eval_seconds = 0.0
            self._mark("begin", state)
            self.t0 = self.marks["begin"][2]
            self.last_log = self.marks["begin"]

        def on_step_end(self, args, state, control, **kw):
            if preempted.signal:
                control.should_save = True
                control.should_training_stop = True
            if state.global_step - self.start_step == self.k0 and self.k0:
                self._mark("warm", state)
            if state.global_step >= state.max_steps or control.should_training_stop:
                self._mark("end", state)

        def on_save(self, args, state, control, **kw):
            """Check the checkpoint just written; a broken one is set aside at once (with a
            warning), so that neither a resume nor the Trainer's rotation takes it for a good one."""
            if int(os.environ.get("RANK", "0")) == 0:
                set_aside_if_broken(Path(args.output_dir) / f"checkpoint-{state.global_step}")

        def on_log(self, args, state, control, logs=None, **kw):
            logs = dict(logs or {})
            now, seen = time.perf_counter(), state.num_input_tokens_seen
            step0, seen0, t_prev = self.last_log
            tps = (seen - seen0) / max(now - t_prev, 1e-9)
            if "loss" in logs and state.global_step > step0:  # a training log, not the end-of-training summary
                self.last_log = (state.global_step, seen, now)
                logs["interval_tokens_per_s"] = tps
            run.log_metrics({k: v for k, v in logs.items() if k != "epoch"}, step=state.global_step)
            if "eval_loss" in logs:
                if ("warm" in self.marks or not self.k0) and "end" not in self.marks:  # left out of the steady rate
                    self.eval_seconds += logs.get("eval_runtime", 0.0)
                print(f"eval {state.global_step}/{total_steps} | eval_loss {logs['eval_loss']:.4f} (held-out)",
                      flush=True)
            if "loss" in logs:
                done = state.global_step - (self.start_step or 0)
                eta = (total_steps - state.global_step) * (now - self.t0) / max(done, 1)
                print(f"step {state.global_step}/{total_steps} | loss {logs['loss']:.4f} | "
                      f"lr {logs.get('learning_rate', 0):.2e} | {tps:,.0f} tok/s | "
                      f"ETA {eta / 60:.1f} min", flush=True)

        def timing(self) -> dict:
            """Steady-state tokens/s and warm-up time of this session (see make_callback)."""
            begin = self.marks.get("begin")
            end = self.marks.get("end")
            if begin is None or end is None:
                return {"tokens_per_s": None, "warmup_seconds": None, "warmup_steps": 0,
                        "steady_steps": 0, "steady_tokens": 0, "steady_seconds": None}
            warm = self.marks.get("warm", begin)
            steps, toks = end[0] - warm[0], end[1] - warm[1]
            secs = end[2] - warm[2] - self.eval_seconds  # held-out evaluations (eval_steps) left out
            return {"tokens_per_s": toks / secs if toks and secs > 0 else None,
                    "warmup_seconds": warm[2] - begin[2], "warmup_steps": warm[0] - begin[0],
                    "steady_steps": steps, "steady_tokens": toks, "steady_seconds": secs,
                    "eval_seconds": self.eval_seconds}

    return Progress()


def inputs_fingerprint(recipe: dict, inputs: list[str]) -> dict:
    """What a run's checkpoints belong to: the recipe and the identity (path, size, mtime) of every
    input file, so a regenerated base model or dataset counts as new without hashing weights."""
    files = {}
    for top in map(Path, inputs):
        for f in sorted(top.rglob("*") if top.is_dir() else [top]):
            if f.is_file():
                st = f.stat()
                files[str(f)] = [st.st_size, st.st_mtime_ns]
    return {"recipe": recipe, "inputs": hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()}


def claim_checkpoints(folder: Path, fingerprint: dict) -> None:
    """Resume only from checkpoints of the same recipe and inputs. When Snakemake reruns a training
    job because a recipe key or an input changed, checkpoints left by the earlier configuration
    are removed (and the reason printed) instead of being resumed from."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back (tuples become lists)
    stamp = folder / "fingerprint.json"
    if folder.is_dir() and any(folder.iterdir()):
        old = json.loads(stamp.read_text()) if stamp.is_file() else None
        if old == fingerprint:
            return
        if old is None:
            why = "they carry no fingerprint"
        else:
            keys = sorted(k for k in set(old["recipe"]) | set(fingerprint["recipe"])
                          if old["recipe"].get(k) != fingerprint["recipe"].get(k))
            why = f"recipe keys changed: {', '.join(keys)}" if keys else "the base model or data changed"
        print(f"checkpoints in {folder} are from another configuration ({why}): starting over", flush=True)
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(stamp, fingerprint)


def tracking_resume(out: str, checkpoints: str | None, recipe: dict, inputs: list[str]) -> Path:
    """Where the step keeps its MLflow run id (``step_run(resume=...)``): in its checkpoint folder,
    claimed first, so that a folder of another configuration is emptied (with its run id) before a
    run could be reopened from it."""
    folder = Path(checkpoints or Path(out).with_name(Path(out).name + ".checkpoints"))
    claim_checkpoints(folder, inputs_fingerprint(recipe, inputs))
    return folder / MLFLOW_RUN


def checkpoint_problems(path: Path) -> list[str]:
    """Why a Trainer checkpoint cannot be resumed from (empty: it is whole): trainer_state.json
    must parse, every safetensors file must hold the tensors its header lists, and every torch
    file (optimizer, scheduler, RNG state) must be a whole zip archive."""
    import zipfile

    from snaketune.model import damaged_weights

    problems = []
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError) as exc:
        problems.append(f"trainer_state.json: {exc}")
    problems += [p.removeprefix(f"{path}/") for p in damaged_weights(path)]
    for f in sorted(path.rglob("*.pt")) + sorted(path.rglob("*.pth")):
        if not zipfile.is_zipfile(f):
            problems.append(f"{f.relative_to(path)}: truncated or not a torch file")
    return problems


def latest_checkpoint(folder: Path) -> str | None:
    """The newest whole Trainer checkpoint under ``folder``. A newer one that is broken (a kill or
    a full disk while it was written) is renamed ``broken-checkpoint-N`` with a warning, and the
    previous one is used."""
    if not folder.is_dir():
        return None
    for path in sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]), reverse=True):
        if int(os.environ.get("RANK", "0")) == 0:
            if not set_aside_if_broken(path, "resuming from the one before it"):
                return str(path)
        elif not checkpoint_problems(path):
            return str(path)
    return None


def set_aside_if_broken(path: Path, then: str = "training goes on") -> bool:
    """Rename a broken checkpoint ``broken-checkpoint-N`` with a warning; True if it was broken."""
    problems = checkpoint_problems(path) if path.is_dir() else []
    if problems:
        aside = path.with_name("broken-" + path.name)
        shutil.rmtree(aside, ignore_errors=True)
        path.rename(aside)
        print(f"warning: checkpoint {path} is broken ({'; '.join(problems[:3])}); set aside as {aside.name}, {then}",
              file=sys.stderr, flush=True)
    return bool(problems)


def base_dtype(base: str) -> str | None:
    """The dtype a model folder declares in config.json (``dtype``, or transformers 4's
    ``torch_dtype``), e.g. ``bfloat16``; None when it declares none."""
    config = json.loads((Path(base) / "config.json").read_text())
    return config.get("dtype") or config.get("torch_dtype")


def cast_saved_weights(folder: Path, dtype: str) -> None:
    """Rewrite a saved model's fp32 tensors in ``dtype`` and say so in its config.json: a full
    fine-tune with fp32 master weights is saved in its base's dtype (a bf16 Qwen2.5-1.5B came out at
    6.2 GB instead of 3.1 before), as the hub's models and other trainers' outputs are."""
    import torch
    from safetensors.torch import load_file, save_file

    target = getattr(torch, dtype)
    for shard in sorted(folder.glob("*.safetensors")):
        tensors = {k: v.to(target) if v.dtype == torch.float32 else v for k, v in load_file(shard).items()}
        save_file(tensors, shard, metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["dtype"] = dtype
    write_json(folder / "config.json", config)


def save(trainer, tokenizer, summary: dict, out: Path, initial_adapter: Path | None = None,
         save_dtype: str | None = None, image_processor=None) -> None:
    """Save through the trainer (it gathers FSDP/ZeRO-3 shards) into a temporary sibling that rank 0
    completes and renames into place. With ``initial_adapter`` (PiSSA/OLoRA) the adapter is saved
    converted: a plain LoRA of rank 2r that applies to the original base. With ``save_dtype`` (a
    full model trained on fp32 master weights) the weights are saved cast to it. A vision-language
    model's ``image_processor`` is saved beside the tokenizer."""
    partial = out.with_name(f".{out.name}.partial")
    if trainer.is_world_process_zero() and partial.exists():
        shutil.rmtree(partial)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(partial))
    if trainer.is_world_process_zero():
        if initial_adapter:
            model = trainer.accelerator.unwrap_model(trainer.model)
            model.save_pretrained(str(partial), path_initial_model_for_weight_conversion=str(initial_adapter))
            summary["adapter_converted_from"] = "rank-r adapter on the rewritten base (PiSSA/OLoRA)"
            print(f"saved as a plain LoRA of rank {model.peft_config['default'].r * 2} on the original base "
                  "(peft weight conversion)", flush=True)
        if save_dtype:
            cast_saved_weights(partial, save_dtype)
        tokenizer.save_pretrained(partial)
        if image_processor is not None:
            image_processor.save_pretrained(partial)
        (partial / "training_args.bin").unlink(missing_ok=True)
        write_json(partial / "training.json", summary)
        if out.exists():
            shutil.rmtree(out)
        os.replace(partial, out)
    trainer.accelerator.wait_for_everyone()


def drop_checkpoints(trainer, checkpoints: Path, recipe: dict) -> None:
    """Delete the run's checkpoint folder (rank 0) once the final model is in place, unless the
    recipe says ``keep_checkpoints``: a finished run has nothing left to resume."""
    if recipe["keep_checkpoints"] or not trainer.is_world_process_zero() or not checkpoints.exists():
        return
    size = sum(f.stat().st_size for f in checkpoints.rglob("*") if f.is_file())
    shutil.rmtree(checkpoints)
    print(f"deleted the checkpoints ({size / 2**30:.2f} GiB in {checkpoints}): the run is finished; "
          "keep_checkpoints: true keeps them", flush=True)


def single_process_group() -> None:
    """FSDP and DeepSpeed need a process group even on one GPU: make this process rank 0 of 1."""
    import socket

    if "RANK" in os.environ:
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def start(base: str, data: list[str], recipe: dict, out: str, checkpoints: str | None) -> SimpleNamespace:
    """A run's setup: the recipe with the schema's defaults, a process group where the recipe shards
    the model, the CPU threads, the dtype, the checkpoint folder claimed for these inputs (checkpoints
    of another recipe or other inputs are set aside, never resumed) and the base's tokenizer."""
    import torch
    from transformers import AutoTokenizer

    recipe = resolve("recipes", recipe)
    if sharded(recipe):
        single_process_group()
    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(recipe["threads"])
    dtype_name, dtype = pick_dtype(recipe, cuda)
    checkpoints = Path(checkpoints or Path(out).with_name(Path(out).name + ".checkpoints"))
    claim_checkpoints(checkpoints, inputs_fingerprint(recipe, [base, *data]))
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return SimpleNamespace(recipe=recipe, cuda=cuda, dtype_name=dtype_name, dtype=dtype, checkpoints=checkpoints,
                           tokenizer=tokenizer, world=int(os.environ.get("WORLD_SIZE", "1")))


def total_steps(recipe: dict, rows: int, world: int) -> int:
    """``max_steps``, else the steps of ``epochs`` passes over ``rows`` at batch_size x
    gradient_accumulation_steps x processes."""
    per_epoch = math.ceil(rows / (recipe["batch_size"] * recipe["gradient_accumulation_steps"] * world))
    return recipe.get("max_steps") or math.ceil(per_epoch * recipe["epochs"])


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters of the policy (a trl reference copy, ``.ref.``, not counted)."""
    params = [(n, p) for n, p in model.named_parameters() if ".ref." not in n]
    return sum(p.numel() for _, p in params if p.requires_grad), sum(p.numel() for _, p in params)


def run_trainer(trainer, checkpoints: Path, preempted: Preempted, cuda: bool, headline: str, recipe: dict,
                name: str | None):
    """Train to the end from the newest complete checkpoint (printing ``headline`` first); exit 75
    (EXIT_REQUEUE) when a preemption signal stopped it at a checkpoint; a SnaketuneError with the
    recipe ``name``'s keys to change when the GPU runs out of memory (``oom_advice``). Returns
    (trainer.train()'s output, the checkpoint resumed from or None, seconds of trainer.train())."""
    import torch
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the progress callback prints instead
    resume = latest_checkpoint(checkpoints)
    if resume:
        print(f"resuming from {resume}", flush=True)
    print(headline, flush=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    freeze_heap()
    t0 = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    except torch.OutOfMemoryError as err:
        raise SnaketuneError(oom_advice(err, trainer, recipe, name, cuda)) from err
    seconds = time.perf_counter() - t0
    if preempted.signal:
        print(f"stopped by {preempted.signal} at step {trainer.state.global_step}; checkpoint in "
              f"{checkpoints}; rerun to resume", file=sys.stderr, flush=True)
        sys.exit(EXIT_REQUEUE)
    return result, resume, seconds


def oom_advice(err, trainer, recipe: dict, name: str | None, cuda: bool) -> str:
    """What ran out (the GPU, its peak, the step), what the recipe asked for, and the config.yaml
    keys that need less memory, cheapest first: recompute activations, the same effective batch in
    smaller pieces, shorter samples, a 4-bit base under a LoRA."""
    import torch

    where = ""
    if cuda:
        device = torch.cuda.current_device()
        where = (f" on {torch.cuda.get_device_name(device)} "
                 f"({torch.cuda.get_device_properties(device).total_memory / 2**30:.1f} GiB, PyTorch's peak "
                 f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB)")
    tried = re.search(r"Tried to allocate ([\d.]+ \w+)", str(err))
    key = f"recipes.{name or '<name>'}."
    batch, accumulation, max_length = recipe["batch_size"], recipe["gradient_accumulation_steps"], recipe["max_length"]
    fixes = []
    if not recipe["gradient_checkpointing"]:
        fixes.append(f"{key}gradient_checkpointing: true (activations recomputed in the backward pass: "
                     "slower steps, far less memory)")
    if batch > 1:
        smaller = batch // 2 if batch % 2 == 0 else 1
        fixes.append(f"{key}batch_size: {smaller} with {key}gradient_accumulation_steps: "
                     f"{accumulation * batch // smaller} (the same effective batch)")
    shortest = block_schema("recipes.max_length")["minimum"]
    if max_length > shortest:
        fixes.append(f"{key}max_length: {max(shortest, max_length // 2)} (longer samples are truncated or dropped)")
    if recipe["train_type"] in LORA_TYPES and recipe["train_type"] != "qlora":
        dtype = "bf16" if trainer.args.bf16 else "fp16" if trainer.args.fp16 else "fp32"
        fixes.append(f"{key}train_type: qlora (the frozen base in 4 bits instead of {dtype})")
    asked = (f"out of GPU memory{where} after {trainer.state.global_step} of {trainer.args.max_steps} steps"
             f"{f' (tried to allocate {tried[1]})' if tried else ''}: batch_size {batch} x gradient_accumulation_steps "
             f"{accumulation} per device at max_length {max_length}.")
    if not fixes:
        return f"{asked} The recipe's memory keys are at their lowest: shard the model over several GPUs " \
               f"({key}distributed.strategy: fsdp) or train a smaller one."
    return f"{asked} Each of these needs less memory (config.yaml, cheapest first):\n  " + "\n  ".join(fixes)


def run_record(trainer, result, resume: str | None, seconds: float, progress, cuda: bool, dtype_name: str) -> dict:
    """What training.json records of every run (the steps add their own fields): steps, the
    checkpoint it resumed from, losses (a run shorter than logging_steps logs no step loss: the run's
    mean stands in), tokens, time, steady-state rate, memory, parameters, dtype and log history."""
    import torch

    from snaketune.tracking import peak_rss_mb

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    trainable, total = parameter_counts(trainer.model)
    return {
        "steps": trainer.state.global_step,
        "resumed_from": resume,
        "train_loss": result.training_loss,
        "first_loss": losses[0] if losses else result.training_loss,
        "final_loss": losses[-1] if losses else result.training_loss,
        "tokens": trainer.state.num_input_tokens_seen,
        "wall_seconds": seconds,  # the whole trainer.train(): warm-up, steps, checkpoint saves
        **progress.timing(),  # tokens_per_s: steady state, after the warm-up steps, before any save
        "gpu_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "peak_rss_mb": peak_rss_mb(),  # this process (rank 0)
        "trainable_params": trainable,
        "total_params": total,
        "dtype": dtype_name,
        "log_history": trainer.state.log_history,
    }


def step_parser(prog: str, description: str, cache_help: str) -> argparse.ArgumentParser:
    """The command line of the train and align steps (the train rules start either the same way)."""
    ap = argparse.ArgumentParser(prog=prog, description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="HF model folder to start from")
    ap.add_argument("--data", required=True, nargs="+", help="dataset folder(s) from the data step")
    ap.add_argument("--params", required=True, help="JSON: the recipes.<name> block of the config")
    ap.add_argument("--out", required=True, help="output adapter (LoRA family) or model (full) folder")
    ap.add_argument("--checkpoints", help="checkpoint folder (default: <out>.checkpoints)")
    ap.add_argument("--cache-dir", help=cache_help)
    ap.add_argument("--model-name", help="the config's model name, recorded as model (the workflow passes it)")
    ap.add_argument("--variant", help="the recipe's name, recorded in training.json")
    return ap
