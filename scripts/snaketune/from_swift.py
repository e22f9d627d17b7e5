"""``snaketune from-swift``: an ms-swift training command line as a snaketune study config.

    snaketune from-swift [--out FILE] [--study NAME] [--bench DATASET] [--ignore-unknown] \\
        -- swift sft --model Qwen/Qwen2.5-0.5B-Instruct --dataset 'AI-ModelScope/alpaca-gpt4-data-en#500' ...

``swift sft`` and ``swift pt`` become one ``sft``/``pt`` recipe, ``swift rlhf --rlhf_type
dpo|kto|orpo|simpo|cpo`` one alignment recipe, with the model, datasets (hub ids, local files,
``#N`` sampling as ``samples``), a bench on the held-out split and ``evaluation`` of base and the
recipe. Flags the command leaves out get ms-swift's defaults where they differ from snaketune's
(``DEFAULTS``), listed in the file's header. Flags with no bearing on the trained model (output
folders, logging backends, workers) are listed as ignored. Any other flag stops the conversion
with its name (a study that silently drops a setting would not be the user's run);
``--ignore-unknown`` converts anyway and lists them. The config is checked against the schema
before it is written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import sys
from pathlib import Path

from snaketune.errors import SnaketuneError, cli
from snaketune.schema import block_schema

STAGES = {"dpo", "kto", "orpo", "simpo", "cpo"}  # swift rlhf --rlhf_type values with a snaketune stage
# ms-swift's defaults (its documented TrainArguments/TunerArguments) that differ from snaketune's
# schema defaults: filled in when the command leaves the flag out, so the study is the user's run.
DEFAULTS = {"seed": 42, "num_train_epochs": 3, "per_device_train_batch_size": 1, "weight_decay": 0.1,
            "adam_beta2": 0.95, "lora_dropout": 0.05, "truncation_strategy": "delete"}
SWIFT_TOTAL_BATCH = 16  # ms-swift: gradient_accumulation_steps unset -> ceil(16 / batch / GPUs)
DTYPES = {"bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16", "float32": "fp32", "fp32": "fp32"}
SCHEDULERS = {"linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt"}
OPTIMS = {"adamw_torch", "adamw_torch_fused", "adamw_bnb_8bit", "paged_adamw_8bit", "adafactor", "sgd"}
# flags that do not change the trained model or its data (where it is written, how it is logged,
# loader workers, checkpoint rotation, ms-swift's own bookkeeping)
NO_EFFECT = {"output_dir", "logging_dir", "report_to", "add_version", "check_model", "save_strategy",
             "save_only_model", "save_total_limit", "dataloader_num_workers", "dataset_num_proc",
             "eval_strategy", "evaluation_strategy", "per_device_eval_batch_size", "load_from_cache_file",
             "lazy_tokenize", "attn_impl", "ddp_backend", "ddp_timeout", "logging_first_step", "use_hf",
             "model_revision", "deepspeed", "data_seed", "model_type", "template", "max_new_tokens",
             "save_safetensors", "metric_for_best_model", "greater_is_better", "load_best_model_at_end",
             "ignore_args_error", "run_name", "push_to_hub", "hub_model_id", "hub_token", "acc_strategy",
             "dataloader_pin_memory", "split_dataset_ratio", "val_dataset", "gradient_checkpointing_kwargs"}
NOTES = {"template": "snaketune formats with the model's own chat template (ms-swift's --template {} is not used)",
         "model_type": "the model type is read from the model's config.json",
         "data_seed": "snaketune shuffles the data with the study seed (ms-swift's --data_seed {} is not used)",
         "max_new_tokens": "the bench generates at most {} new tokens"}


def parse_swift(argv: list[str]) -> tuple[str, dict[str, list[str]]]:
    """(``sft``/``pt``/``rlhf``, {flag: values}) from ``swift <cmd> --flag value ...``; environment
    assignments before ``swift`` (``CUDA_VISIBLE_DEVICES=0``) are skipped except ``USE_HF=1`` (as
    ``--use_hf true``), ``--flag=value`` is read."""
    if len(argv) == 1 and " " in argv[0]:
        argv = shlex.split(argv[0])
    argv = [a for a in argv if a != "\\\n" and a != "\\"]
    env = {}
    while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):
        key, _, value = argv[0].partition("=")
        env[key], argv = value, argv[1:]
    if len(argv) < 2 or Path(argv[0]).name != "swift":
        raise SnaketuneError("from-swift reads an ms-swift command after `--`: snaketune from-swift -- swift sft "
                             f"--model ... --dataset ... (got {' '.join(argv[:3]) or 'nothing'})")
    command = argv[1]
    if command not in ("sft", "pt", "rlhf"):
        raise SnaketuneError(f"swift {command}: from-swift converts training commands (swift sft, swift pt, "
                             "swift rlhf); for inference use snaketune chat MODEL_DIR")
    flags: dict[str, list[str]] = {}
    key = None
    for token in argv[2:]:
        if token.startswith("--"):
            key, eq, value = token[2:].partition("=")
            key = key.replace("-", "_")
            flags[key] = [value] if eq else []
        elif key is None:
            raise SnaketuneError(f"swift {command}: {token!r} comes before any --flag: every value follows its flag")
        else:
            flags[key].append(token)
    if env.get("USE_HF", "").lower() in ("1", "true") and "use_hf" not in flags:
        flags["use_hf"] = ["true"]  # ms-swift reads the hub choice from USE_HF=1 as well
    return command, flags


def _one(flags: dict, key: str, kind=str, default=None):
    if key not in flags:
        return default
    values = flags[key]
    if len(values) != 1:
        raise SnaketuneError(f"--{key}: expected one value, found {len(values)} ({' '.join(values) or 'none'})")
    try:
        return kind(values[0])
    except ValueError:
        raise SnaketuneError(f"--{key} {values[0]}: expected a {kind.__name__}") from None


def _bool(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise ValueError(value)


_bool.__name__ = "boolean (true/false)"


def _name(text: str, taken: set[str]) -> str:
    """A config key (``[A-Za-z0-9][A-Za-z0-9_.-]*``) from a hub id or path, unique among ``taken``."""
    stem = Path(text.rstrip("/")).name
    for ext in (".jsonl", ".json", ".csv", ".parquet", ".gguf"):
        stem = stem.removesuffix(ext)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem.lower()).strip("-.") or "data"
    if not name[0].isalnum():
        name = "x" + name
    base, i = name, 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    taken.add(name)
    return name


def model_block(spec: str, use_hf: bool, revision: str | None, notes: list[str]) -> dict:
    path = Path(spec).expanduser()
    if spec.endswith(".gguf") or path.is_dir() or spec.startswith(("/", "./", "../", "~")) or "/" not in spec:
        if not path.exists():
            raise SnaketuneError(f"--model {spec}: no such folder here, and not a hub id (organisation/name): give "
                                 "the model's folder or its hub id")
        return {"source": "gguf" if spec.endswith(".gguf") else "local", "path": os.path.abspath(path)}
    source = "hf" if use_hf else "modelscope"
    if not revision:
        revision = "main" if use_hf else "master"
        notes.append(f"model {spec}: revision {revision} (the branch, as ms-swift loads it); pin a commit "
                     "for a reproducible study")
    return {"source": source, "repo": spec, "revision": revision}


def detect_format(path: Path) -> str | None:
    """The snaketune format of a local file's rows, from its first row (None when unreadable)."""
    try:
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as fh:
                row = json.loads(next(line for line in fh if line.strip()))
        elif path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            row = data[0] if isinstance(data, list) and data else None
        elif path.suffix == ".csv":
            import csv

            with open(path, encoding="utf-8", newline="") as fh:
                row = dict.fromkeys(next(csv.reader(fh)), "")
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq

            row = dict.fromkeys(pq.read_schema(path).names, "")
        else:
            return None
    except (OSError, ValueError, StopIteration, ImportError):
        return None
    if not isinstance(row, dict):
        return None
    keys = set(row)
    if {"rejected_response", "rejected_messages"} & keys or {"prompt", "chosen", "rejected"} <= keys:
        return "preference"
    if "label" in keys and ({"messages", "query"} & keys or {"prompt", "completion"} <= keys):
        return "kto"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys or {"input", "output"} <= keys:
        return "alpaca"
    if "messages" in keys:
        msgs = row["messages"] if isinstance(row.get("messages"), list) else []
        if msgs and all(isinstance(m, dict) and m.get("role") == "assistant" for m in msgs):
            return "text"
        return "messages"
    if {"query", "response"} & keys:
        return "messages"
    if "text" in keys:
        return "text"
    return None


WANTS = {"pt": ("text",), "sft": ("messages", "alpaca", "sharegpt"), "kto": ("kto",)}


def dataset_block(spec: str, stage: str, use_hf: bool, notes: list[str]) -> dict:
    """A datasets block from one ms-swift ``--dataset`` entry: ``id[:subset][#N]`` or a local file."""
    spec, _, sample = spec.partition("#")
    block: dict = {}
    path = Path(spec).expanduser()
    local = path.suffix in (".jsonl", ".json", ".csv", ".parquet") or path.exists()
    wants = WANTS.get(stage, ("preference",))
    if local:
        if not path.is_file():
            raise SnaketuneError(f"--dataset {spec}: no such file (a local dataset must exist to be read; "
                                 "a hub dataset is an id such as AI-ModelScope/alpaca-gpt4-data-en)")
        fmt = detect_format(path)
        if fmt is None:
            raise SnaketuneError(f"--dataset {spec}: cannot tell the layout of its first row: snaketune reads "
                                 "messages, query/response, alpaca, sharegpt, text and preference/kto rows "
                                 "(README, Data formats)")
        block = {"source": "local", "path": os.path.abspath(path), "format": fmt}
    else:
        repo, _, subset = spec.partition(":")
        block = {"source": "hf" if use_hf else "modelscope", "repo": repo}
        if subset:
            block["subset"] = subset
        low = repo.lower()
        fmt = "alpaca" if "alpaca" in low else "sharegpt" if "sharegpt" in low else wants[0]
        block["format"] = fmt
        notes.append(f"dataset {repo}: format {fmt} assumed (a hub dataset is not downloaded here); "
                     "set alpaca, sharegpt or messages to what its rows hold")
    if fmt not in wants:
        raise SnaketuneError(f"--dataset {spec}: its rows are {fmt}, but swift {'rlhf' if stage in STAGES else stage} "
                             f"{'--rlhf_type ' + stage + ' ' if stage in STAGES else ''}trains on "
                             f"{' / '.join(wants)} rows: give a dataset of that layout")
    if sample:
        if not sample.isdigit() or int(sample) < 1:
            raise SnaketuneError(f"--dataset {spec}#{sample}: the part after # is the number of rows to sample")
        block["samples"] = int(sample)
    return block


def convert(argv: list[str], study: str | None = None, bench: str | None = None,
            ignore_unknown: bool = False) -> tuple[dict, list[str]]:
    """(config, header notes) from an ms-swift command line."""
    command, flags = parse_swift(argv)
    notes: list[str] = []
    used: set[str] = set()

    def take(key, kind=str, default=None):
        used.add(key)
        return _one(flags, key, kind, default)

    def take_list(key):
        used.add(key)
        return flags.get(key)

    # stage and train type -----------------------------------------------------------------------------
    if command == "rlhf":
        stage = take("rlhf_type", default="dpo")
        if stage not in STAGES:
            raise SnaketuneError(f"--rlhf_type {stage}: from-swift converts {', '.join(sorted(STAGES))} (snaketune "
                                 "also has rm and grpo recipes: write those by hand, README Preference alignment)")
    else:
        stage = command
    train_type = take("tuner_type", default=None) or take("train_type", default="lora")
    used |= {"tuner_type", "train_type"}
    if train_type not in ("lora", "full"):
        raise SnaketuneError(f"--train_type {train_type}: snaketune trains full or lora (with --use_dora, "
                             "--use_rslora, --init_weights pissa/olora, --quant_bits 4/8); not "
                             f"{train_type}")
    recipe: dict = {"stage": stage}
    quant_bits = take("quant_bits", int)
    quant_method = take("quant_method")
    if train_type == "full":
        if quant_bits:
            raise SnaketuneError("--quant_bits with --train_type full: a quantized base trains only with lora (QLoRA)")
        recipe["train_type"] = "full"
    elif quant_bits:
        if quant_method not in (None, "bnb"):
            raise SnaketuneError(f"--quant_method {quant_method}: QLoRA training uses bitsandbytes (--quant_method bnb)")
        recipe["train_type"] = "qlora"
        recipe["quantization"] = {"bits": quant_bits}
        if take("bnb_4bit_quant_type"):
            recipe["quantization"]["quant_type"] = flags["bnb_4bit_quant_type"][0]
        if "bnb_4bit_use_double_quant" in flags:
            recipe["quantization"]["double_quant"] = take("bnb_4bit_use_double_quant", _bool)
    else:
        init = take("init_weights") or take("init_lora_weights")
        variant = [t for t, on in (("dora", take("use_dora", _bool, False)), ("rslora", take("use_rslora", _bool, False)),
                                   ("pissa", init == "pissa"), ("olora", init == "olora")) if on]
        if len(variant) > 1:
            raise SnaketuneError(f"{' and '.join(variant)} together: snaketune trains one LoRA variant per recipe")
        if init not in (None, "true", "True", "pissa", "olora"):
            raise SnaketuneError(f"--init_weights {init}: snaketune initialises LoRA as peft does, or pissa/olora")
        recipe["train_type"] = variant[0] if variant else "lora"
    if recipe["train_type"] != "full":
        lora = {"r": take("lora_rank", int, 8), "alpha": take("lora_alpha", float, 32),
                "dropout": take("lora_dropout", float, DEFAULTS["lora_dropout"])}
        lora["alpha"] = int(lora["alpha"]) if float(lora["alpha"]).is_integer() else lora["alpha"]
        if "lora_dropout" not in flags:
            notes.append(f"lora.dropout {DEFAULTS['lora_dropout']}: ms-swift's default")
        modules = take_list("target_modules")
        if modules:
            lora["target_modules"] = modules[0] if modules == ["all-linear"] else modules
        if take_list("modules_to_save"):
            lora["modules_to_save"] = flags["modules_to_save"]
        recipe["lora"] = lora

    # optimiser and schedule -----------------------------------------------------------------------------
    def setting(key, flag, kind=float, default_note=True):
        value = take(flag, kind)
        if value is None and flag in DEFAULTS:
            value = DEFAULTS[flag]
            if default_note:
                notes.append(f"{key} {value}: ms-swift's default")
        if value is not None:
            recipe[key] = value

    if "learning_rate" in flags:
        recipe["learning_rate"] = take("learning_rate", float)
    setting("weight_decay", "weight_decay")
    setting("adam_beta1", "adam_beta1")
    setting("adam_beta2", "adam_beta2")
    setting("adam_epsilon", "adam_epsilon")
    setting("max_grad_norm", "max_grad_norm")
    scheduler = take("lr_scheduler_type")
    if scheduler:
        if scheduler not in SCHEDULERS:
            raise SnaketuneError(f"--lr_scheduler_type {scheduler}: snaketune has {', '.join(sorted(SCHEDULERS))}")
        recipe["lr_scheduler"] = scheduler
    optim = take("optim")
    if optim:
        if optim not in OPTIMS:
            raise SnaketuneError(f"--optim {optim}: snaketune has {', '.join(sorted(OPTIMS))}")
        recipe["optim"] = optim

    # length of training, batch ------------------------------------------------------------------------
    max_steps = take("max_steps", int)
    if max_steps and max_steps > 0:
        recipe["max_steps"] = max_steps
    else:
        setting("epochs", "num_train_epochs")
    setting("batch_size", "per_device_train_batch_size", int)
    accum = take("gradient_accumulation_steps", int)
    if accum is None:
        accum = max(1, math.ceil(SWIFT_TOTAL_BATCH / recipe["batch_size"]))
        notes.append(f"gradient_accumulation_steps {accum}: ms-swift's default for one GPU (a total batch of "
                     f"{SWIFT_TOTAL_BATCH}); ms-swift divides it by the GPU count")
    recipe["gradient_accumulation_steps"] = accum
    warmup_ratio, warmup_steps = take("warmup_ratio", float), take("warmup_steps", int)
    if warmup_steps:
        if not max_steps:
            raise SnaketuneError(f"--warmup_steps {warmup_steps} without --max_steps: snaketune's warmup is a ratio "
                                 "of the training steps; give --warmup_ratio instead")
        warmup_ratio = warmup_steps / max_steps
    if warmup_ratio is not None:
        recipe["warmup_ratio"] = warmup_ratio

    max_length = take("max_length", int)
    if max_length:
        recipe["max_length"] = max_length
    else:
        notes.append("max_length: ms-swift's default is the model's context length; snaketune's schema default "
                     "applies (set max_length to the length you trained with)")
    truncation = take("truncation_strategy") or DEFAULTS["truncation_strategy"]
    if truncation not in ("delete", "right"):
        raise SnaketuneError(f"--truncation_strategy {truncation}: snaketune drops long samples (delete) or cuts "
                             "their end (right)")
    recipe["truncation"] = "drop" if truncation == "delete" else "truncate"
    if "truncation_strategy" not in flags:
        notes.append("truncation drop: ms-swift's default (truncation_strategy delete)")
    dtype = take("torch_dtype")
    if dtype:
        if dtype not in DTYPES:
            raise SnaketuneError(f"--torch_dtype {dtype}: use bfloat16, float16 or float32")
        recipe["dtype"] = DTYPES[dtype]
    for flag, key in (("gradient_checkpointing", "gradient_checkpointing"), ("packing", "packing"),
                      ("padding_free", "packing"), ("use_liger_kernel", "fused_ce"), ("use_liger", "fused_ce")):
        if flag in flags:
            recipe[key] = take(flag, _bool)
    for flag in ("logging_steps", "save_steps", "eval_steps"):
        if flag in flags:
            recipe[flag] = take(flag, int)
    system = take("system")
    if system:
        recipe["system"] = system
    deepspeed = take("deepspeed")
    if deepspeed:
        m = re.fullmatch(r"zero([23])(_offload)?", deepspeed)
        if not m:
            raise SnaketuneError(f"--deepspeed {deepspeed}: snaketune takes zero2, zero3, zero2_offload, zero3_offload")
        recipe["distributed"] = {"strategy": "deepspeed", "zero_stage": int(m[1]), "offload": bool(m[2])}
    block_keys = block_schema("recipes").get("properties", {}).get(stage, {}).get("properties", {})
    block = {}
    for flag, kind in (("beta", float), ("simpo_gamma", float), ("cpo_alpha", float),
                       ("desirable_weight", float), ("undesirable_weight", float), ("label_smoothing", float),
                       ("loss_type", None)):
        if flag not in flags:
            continue
        if flag not in block_keys:
            raise SnaketuneError(f"--{flag} does not apply to {stage}: snaketune's {stage} recipes take "
                                 f"{', '.join(block_keys) or 'no such keys'} (docs/align.md)")
        if kind is None:
            values = take_list(flag)
            block[flag] = values[0] if len(values) == 1 else values
        else:
            block[flag] = take(flag, kind)
    if block:
        recipe[stage] = block

    # model, data, bench --------------------------------------------------------------------------------
    use_hf = take("use_hf", _bool, False)
    model_spec = take("model")
    if not model_spec:
        raise SnaketuneError("the command has no --model: give the hub id or local folder the run starts from")
    names: set[str] = set()
    model_name = _name(model_spec, names)
    models = {model_name: model_block(model_spec, use_hf, take("model_revision"), notes)}

    specs = take_list("dataset")
    if not specs:
        raise SnaketuneError("the command has no --dataset: give the training data (hub ids or files, #N to sample)")
    datasets = {}
    for spec in specs:
        datasets[_name(spec.partition("#")[0].partition(":")[0], names)] = dataset_block(spec, stage, use_hf, notes)
    train_names = list(datasets)
    ratio = take("split_dataset_ratio", float)
    val = take_list("val_dataset") or []
    if len(val) > 1:
        raise SnaketuneError("--val_dataset with several entries: snaketune holds out one test file per dataset; "
                             "give one")
    first = datasets[train_names[0]]
    if val:
        if first["source"] != "local" or not Path(val[0]).is_file():
            raise SnaketuneError(f"--val_dataset {val[0]}: snaketune takes a local held-out file beside a local "
                                 "dataset (test_path); for hub data use --split_dataset_ratio")
        first["test_path"] = os.path.abspath(val[0])
    for block in datasets.values():
        if ratio is not None and "test_path" not in block:
            block["test_size"] = ratio
    if ratio is None and not val:
        notes.append("held-out split: ms-swift trains on every row by default; snaketune holds out each dataset's "
                     "test_size (the schema default) for the bench: set test_size: 0 and give a test_path to train "
                     "on every row")
    recipe["dataset"] = train_names[0] if len(train_names) == 1 else train_names

    if bench:
        bench_name = _name(bench.partition("#")[0].partition(":")[0], names)
        datasets[bench_name] = dataset_block(bench, "sft", use_hf, notes)
    elif stage in ("sft",):
        bench_name = train_names[0]
    elif stage in STAGES and first["source"] == "local" and first["format"] in ("preference", "kto") \
            and detect_format(Path(first["path"])) and _swift_layout_file(Path(first["path"])):
        # ms-swift's preference/KTO rows hold the whole conversation in messages: the same file read as
        # chat rows (same seed and test_size, so the same held-out rows) is the bench
        bench_name = _name(train_names[0] + "-chat", names)
        datasets[bench_name] = {**{k: v for k, v in first.items() if k != "samples"}, "format": "messages"}
    else:
        raise SnaketuneError(f"swift {command}: the bench needs chat rows (a held-out question and answer) that this "
                             "command's data does not give: name a chat dataset with --bench (ms-swift's dataset "
                             "syntax: a hub id or a local file)")
    if ratio == 0 and not val and bench_name in train_names:
        raise SnaketuneError("--split_dataset_ratio 0 and no --val_dataset: nothing is held out for the bench; give "
                             "--val_dataset FILE, a --split_dataset_ratio above 0, or --bench DATASET")
    max_new = take("max_new_tokens", int)
    benches = {"heldout": {"dataset": bench_name, "metric": "exact_match", **({"max_new_tokens": max_new} if max_new else {})}}
    notes.append("bench heldout: exact match on the held-out rows; for free-form answers use metric contains or an "
                 "EvalScope benchmark (README, Evaluation with EvalScope)")

    recipe_name = f"{stage}-{recipe['train_type']}"
    config = {
        "study": study or _name(f"swift-{model_name}", set()),
        "seed": take("seed", int, DEFAULTS["seed"]),
        "models": models,
        "datasets": datasets,
        "recipes": {recipe_name: recipe},
        "benches": benches,
        "evaluation": {"variants": ["base", recipe_name], "benches": ["heldout"]},
    }
    if "seed" not in flags:
        notes.append(f"seed {DEFAULTS['seed']}: ms-swift's default")

    ignored = sorted(k for k in flags if k in NO_EFFECT and k not in used)
    for key in [k for k in ignored if k in NOTES]:
        notes.append(NOTES[key].format(" ".join(flags[key])))
    ignored = [k for k in ignored if k not in NOTES]
    if ignored:
        notes.append("ignored (no bearing on the trained model here): " + ", ".join(f"--{k}" for k in ignored))
    unknown = sorted(k for k in flags if k not in used and k not in NO_EFFECT)
    if unknown and not ignore_unknown:
        raise SnaketuneError(f"swift {command}: {', '.join('--' + k for k in unknown)} "
                             f"{'has' if len(unknown) == 1 else 'have'} no snaketune equivalent here, so the study "
                             "would not be your run: drop the flag(s), or pass --ignore-unknown to convert without "
                             "them (they are then listed in the config's header)")
    if unknown:
        notes.append("NOT CONVERTED (--ignore-unknown): " + ", ".join(f"--{k} {' '.join(flags[k])}".strip()
                                                                       for k in unknown))
    validate(config)
    return config, notes


def _swift_layout_file(path: Path) -> bool:
    """Whether a local file's rows are ms-swift's (a conversation in ``messages`` or
    ``query``/``response``), which also read as chat rows."""
    try:
        with open(path, encoding="utf-8") as fh:
            row = json.loads(next(line for line in fh if line.strip())) if path.suffix == ".jsonl" else None
    except (OSError, ValueError, StopIteration):
        return False
    return isinstance(row, dict) and "prompt" not in row and bool({"messages", "query"} & set(row))


def schema_path() -> Path:
    from snaketune.cli import repo_root

    return repo_root() / "workflow" / "schemas" / "config.schema.yaml"


def validate(config: dict) -> None:
    """Check ``config`` against the workflow's schema (as the workflow will), naming the keys."""
    import copy

    import jsonschema
    import yaml

    schema = yaml.safe_load(schema_path().read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    problems = [f"{'.'.join(map(str, e.absolute_path)) or '<top level>'}: {e.message}"
                for e in validator.iter_errors(copy.deepcopy(config))]
    if problems:
        raise SnaketuneError("the converted config does not match workflow/schemas/config.schema.yaml (a from-swift "
                             "bug or a value out of range):\n  " + "\n  ".join(problems))


def render(config: dict, notes: list[str], argv: list[str]) -> str:
    import yaml

    command = " ".join(shlex.quote(a) for a in (shlex.split(argv[0]) if len(argv) == 1 else argv))
    head = ["# A snaketune study converted from an ms-swift command (snaketune from-swift):", f"#   {command}",
            "# Run it:  snaketune run THIS_FILE   (README: Running studies)", "#"]
    head += [f"# - {note}" for note in notes]
    return "\n".join(head) + "\n" + yaml.safe_dump(config, sort_keys=False, allow_unicode=True)


@cli
def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    mine, swift = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(prog="snaketune from-swift", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write the config here (default: stdout)")
    ap.add_argument("--study", help="study name (default: swift-<model>)")
    ap.add_argument("--bench", help="a chat dataset to evaluate on (ms-swift syntax); default: the held-out split "
                                    "of the training data")
    ap.add_argument("--ignore-unknown", action="store_true",
                    help="convert even when flags have no snaketune equivalent (listed in the header)")
    args = ap.parse_args(mine)
    if not swift:
        raise SnaketuneError("no ms-swift command: snaketune from-swift -- swift sft --model ... --dataset ...")
    config, notes = convert(swift, args.study, args.bench, args.ignore_unknown)
    text = render(config, notes, swift)
    if args.out:
        from snaketune.atomic import atomic_file

        with atomic_file(args.out) as fh:
            fh.write(text)
        print(f"wrote {args.out}: {len(config['recipes'])} recipe, {len(config['datasets'])} dataset(s); "
              f"run it with: snaketune run {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    for note in notes:
        if note.startswith("NOT CONVERTED"):
            print(f"warning: {note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    main()
