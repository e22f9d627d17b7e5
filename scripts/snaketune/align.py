"""Step `align`: preference alignment and online RL of a causal LM with trl.

One module for every stage after SFT, with the command line of ``train``::

    python -m snaketune.align --base DIR --data DIR [DIR...] --params JSON --out DIR [--checkpoints DIR]

``params`` is the recipe block; its ``stage`` picks the method:

===========  ==========================================  =============================================
stage        data (in every ``--data`` folder)            trainer (trl 1.16)
===========  ==========================================  =============================================
``dpo``      ``preference.jsonl`` prompt/chosen/rejected  ``DPOTrainer`` (every ``loss_type`` it has)
``kto``      ``kto.jsonl`` prompt/completion/label        ``KTOTrainer``
``orpo``     ``preference.jsonl``                         ``trl.experimental.orpo.ORPOTrainer``
``simpo``    ``preference.jsonl``                         ``trl.experimental.cpo.CPOTrainer``, loss simpo
``cpo``      ``preference.jsonl``                         ``trl.experimental.cpo.CPOTrainer``
``rm``       ``preference.jsonl``                         ``RewardTrainer`` (sequence classification)
``grpo``     ``train.jsonl`` (prompt = all but the last   ``GRPOTrainer`` (grpo, dapo, dr_grpo, bnpo,
             turn, answer = the last assistant turn)      gspo, cispo, sapo, luspo, vespo, reinforce++),
                                                          ``RLOOTrainer`` (rloo)
===========  ==========================================  =============================================

``dpo`` also trains a vision-language model on pairs with images (``vision.preference_rows``; the
other stages stop on rows with images). The model is wrapped for the recipe's ``train_type`` with
``snaketune.train.wrap_model`` (full, or a LoRA variant). The reference model of DPO/KTO/GRPO is
the starting checkpoint: with a LoRA-family ``train_type`` it is the same model with the adapter
disabled (no second copy in memory); with ``full`` trl loads one frozen copy. Outputs are those of
``train``: a PEFT adapter folder or an HF model folder (``rm``: an
``AutoModelForSequenceClassification`` folder with one output), with
``training.json``, written atomically. Checkpoints, resume and SIGTERM/SIGUSR1 handling (exit 75)
are those of ``train``. Every logged metric goes to MLflow per step, with the common names ``loss``,
``rewards/chosen``, ``rewards/rejected``, ``margins``, ``accuracies``, ``kl`` and ``reward`` where
the method has them.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from snaketune import vision
from snaketune.errors import SnaketuneError, cli
from snaketune.files import read_jsonl, record_names
from snaketune.registry import LORA_TYPES, STAGES
from snaketune.schema import block_schema, resolve
from snaketune.tracking import NullRun
from snaketune.training import (Preempted, drop_checkpoints, keep_initial_adapter, load_model, make_callback,
                                parameter_counts, run_record, run_trainer, save, saved_dtype, start,
                                step_parser, total_steps, tracking_resume,
                                trainer_args, wrap_model)

ALIGN_STAGES = [name for name, stage in STAGES.items() if stage.step == "align"]
# the grpo: block's variants and the keys passed on to trl's GRPOConfig/RLOOConfig (the schema's)
GRPO_VARIANTS = tuple(block_schema("recipes.grpo")["properties"]["variant"]["enum"])
GRPO_KEYS = tuple(k for k in block_schema("recipes.grpo")["properties"] if k not in ("variant", "rewards", "tools"))

# What each GRPO-family variant means in trl 1.16 terms (recipe keys in ``grpo:`` win over these).
VARIANT_DEFAULTS = {
    "grpo": {"loss_type": "grpo"},
    "dapo": {"loss_type": "dapo", "epsilon_high": 0.28, "mask_truncated_completions": True, "beta": 0.0},
    "dr_grpo": {"loss_type": "dr_grpo", "scale_rewards": "none"},
    "bnpo": {"loss_type": "bnpo"},
    "gspo": {"loss_type": "grpo", "importance_sampling_level": "sequence", "epsilon": 3e-4,
             "epsilon_high": 4e-4, "beta": 0.0},
    "cispo": {"loss_type": "cispo"},
    "sapo": {"loss_type": "sapo"},
    "luspo": {"loss_type": "luspo", "importance_sampling_level": "sequence"},
    "vespo": {"loss_type": "vespo", "importance_sampling_level": "sequence"},
    # REINFORCE++-baseline (Hu et al. 2025): group-mean baseline, advantages normalised over the whole
    # batch, no critic. trl has no dedicated trainer; this is GRPO's objective with batch-level scaling
    # and the KL as a loss term (k3) instead of a per-token reward penalty.
    "reinforce++": {"loss_type": "dapo", "scale_rewards": "batch"},
    "rloo": {},
}

# common MLflow names for what the trainers log under their own names
ALIASES = {"rewards/margins": "margins", "margin": "margins", "rewards/accuracies": "accuracies",
           "accuracy": "accuracies"}


class AliasedRun:
    """Wraps a StepRun: every metric is also logged under its common name (``ALIASES``)."""

    def __init__(self, run):
        self.run = run or NullRun()

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        metrics = dict(metrics)
        for name, alias in ALIASES.items():
            if name in metrics and alias not in metrics:
                metrics[alias] = metrics[name]
        self.run.log_metrics(metrics, step=step)


# ---------------------------------------------------------------------------------------------- data


def load_rows(data_dirs: list, stage: str) -> list[dict]:
    """The stage's rows from every dataset folder (a mix is concatenated; the trainer shuffles)."""
    rows, schemas_left_out = [], 0
    for data_dir in map(Path, data_dirs):
        name = STAGES[stage].data
        path = data_dir / name
        if not path.is_file():
            raise SnaketuneError(f"{path} does not exist: stage {stage!r} reads {name} from the dataset folder "
                                 "(the data step writes it for the synthetic task; bring your own as a local dataset)")
        if stage == "grpo":
            for r in read_jsonl(path):
                msgs = r["messages"]
                if msgs[-1]["role"] != "assistant":
                    raise SnaketuneError(f"{path}: every row must end with an assistant turn (the reference answer)")
                schemas_left_out += bool(r.get("tools"))
                rows.append({"prompt": msgs[:-1], "answer": msgs[-1]["content"]})
        else:  # a DPO row's image paths, relative to its dataset folder, resolved there
            rows += [{**r, "images": [str(data_dir / n) for n in r["images"]]} if r.get("images") else r
                     for r in read_jsonl(path)]
    if schemas_left_out:
        print(f"note: {schemas_left_out} grpo rows declare tools; their prompts are rendered without those schemas "
              "(trl's GRPOTrainer takes tools as Python functions: grpo.tools); earlier tool calls stay",
              file=sys.stderr)
    if not rows:
        raise SnaketuneError(f"no rows for stage {stage!r} in {', '.join(map(str, data_dirs))}")
    return rows


def pretemplate(rows: list[dict], tokenizer) -> list[dict]:
    """Render conversational preference rows to prompt/chosen/rejected text for the ORPO/CPO and
    reward trainers (rows already in text form pass through).

    ORPO/CPO (trl.experimental) append an EOS token to every completion whose last token is not
    EOS; a chat template that ends a turn with ``<|im_end|>\\n`` then gets a second, never-seen
    ``<|im_end|>`` after the newline, which dominates their NLL term. A reward model reads its score
    at the last token: the end-of-turn marker, where generation stops, is what it will be given to
    score (``rewards.chat_text``), and it ranks held-out pairs better there than at the newline
    (tiny task: 0.77 -> 0.84 and 0.58 -> 0.71 for two seeds). Rendering the completion up to and
    including the end-of-turn EOS does both.
    """
    from snaketune.rewards import chat_text

    out = []
    for r in rows:
        if not isinstance(r["prompt"], list):
            out.append(r)
            continue
        tools = r.get("tools")
        head = tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True,
                                             **({"tools": tools} if tools else {}))
        row = {"prompt": head}
        for key in ("chosen", "rejected"):
            full = chat_text(tokenizer, r["prompt"] + r[key], tools)
            row[key] = full[len(head):] if full.startswith(head) else full
        out.append(row)
    return out


# ------------------------------------------------------------------------------------- trl configs


def _common_args(recipe: dict, checkpoints: Path, cuda: bool, dtype_name: str, total_steps: int) -> dict:
    args = trainer_args(recipe, checkpoints, cuda, dtype_name, total_steps)
    # always said: trl's configs default to gradient checkpointing on (transformers' to off)
    args["gradient_checkpointing"] = recipe["gradient_checkpointing"]
    if recipe["gradient_checkpointing"]:  # torch warns without it, and will raise
        args["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    return args


def method_args(recipe: dict, stage: str) -> dict:
    """The stage's own trl config keys: the recipe's ``<stage>:`` block with the schema's defaults
    (``recipes.<stage>``; any other trl field: ``trl_args``), and its ``max_length``."""
    out = resolve(f"recipes.{stage}", recipe.get(stage, {}))
    out.pop("nll", None)  # orpo: which trainer class (orpo_trainer_class), no config key
    if "max_length" in recipe:
        out["max_length"] = recipe["max_length"]
    if stage == "simpo":
        out["loss_type"] = "simpo"
    if stage == "dpo" and isinstance(out.get("loss_type"), str):
        out["loss_type"] = [out["loss_type"]]
    return out


def grpo_args(recipe: dict) -> tuple[str, dict]:
    """The GRPO-family variant and the trl config keys for it (variant defaults, then ``grpo:`` keys,
    the schema's defaults filled in)."""
    g = resolve("recipes.grpo", recipe.get("grpo", {}))
    variant = g.pop("variant")
    if variant not in GRPO_VARIANTS:
        raise SnaketuneError(f"unknown grpo.variant {variant!r}: use one of {', '.join(GRPO_VARIANTS)}")
    g.pop("rewards", None)
    if g.pop("tools", None) and variant == "rloo":
        raise SnaketuneError("grpo.tools needs a GRPOTrainer variant: trl's RLOOTrainer has no tool calling")
    unknown = set(g) - set(GRPO_KEYS)
    if unknown:
        raise SnaketuneError(f"unknown grpo key(s) {', '.join(sorted(unknown))}: use {', '.join(GRPO_KEYS)} "
                             "(or recipes.<name>.trl_args for any other trl GRPOConfig/RLOOConfig field)")
    args = {**VARIANT_DEFAULTS[variant], **g}
    if variant == "rloo":
        for key in ("loss_type", "scale_rewards", "importance_sampling_level", "multi_objective_aggregation",
                    "delta", "top_entropy_quantile", "entropy_coef", "max_tool_calling_iterations"):
            if key in args:
                raise SnaketuneError(f"grpo.{key} does not apply to variant rloo (trl RLOOTrainer)")
    else:
        for key in ("normalize_advantages", "reward_clip_range"):
            if key in args:
                raise SnaketuneError(f"grpo.{key} applies only to variant rloo")
    use_vllm = args["use_vllm"]
    if use_vllm == "auto":  # vLLM generation on a GPU when it is installed; transformers otherwise
        import importlib.util

        import torch

        use_vllm = torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None
    args["use_vllm"] = bool(use_vllm)
    if args["use_vllm"]:
        args.setdefault("vllm_mode", "colocate")
    args.setdefault("beta", 0.05 if variant == "rloo" else 0.04)  # KL weight (GRPO paper: 0.04; trl: 0.0)
    if variant == "reinforce++" and args.get("scale_rewards") != "batch":
        print("note: reinforce++ with scale_rewards other than 'batch' is plain GRPO", file=sys.stderr)
    return variant, args


# ------------------------------------------------------------------------------------------ models


ZERO_INIT_LORA = ("lora", "qlora", "dora", "rslora")  # at init the adapted model equals the base


def load_policy(base: str, recipe: dict, dtype, needs_reference: bool = True):
    """The policy and, for the trainers to wrap themselves, its peft config.

    ``lora``/``dora``/``rslora`` with a reference-based method: the unwrapped model and the
    recipe's LoraConfig (built by ``wrap_model``), so that trl creates the adapter and uses the
    same model with the adapter disabled as reference (no copy). ``pissa``/``olora`` change the
    base weights at init, so the disabled adapter is not the starting model: they are passed
    wrapped and trl keeps a frozen copy of the initial adapter (adapter-sized) as reference.
    """
    import torch

    train_type = recipe.get("train_type", "lora")
    torch.manual_seed(recipe.get("seed", 0))
    model = load_model(base, recipe, dtype, torch.cuda.is_available())  # qlora: 4/8-bit base
    if recipe["gradient_checkpointing"] and train_type != "qlora":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    wrapped = wrap_model(model, recipe)
    if needs_reference and train_type in ZERO_INIT_LORA:
        config = wrapped.peft_config["default"]
        return wrapped.unload(), config
    return wrapped, None


def load_reward_backbone(base: str, recipe: dict, tokenizer, dtype):
    """A sequence-classification model with one output (the reward), wrapped like the policy."""
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(recipe.get("seed", 0))  # the new score head is initialised from the seed
    train_type = recipe.get("train_type", "lora")
    if train_type in ("full", "freeze") and recipe["master_weights"] == "fp32":
        dtype = torch.float32  # trained weights stay fp32 (bf16 runs compute under autocast), as in train
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=dtype)
    model.config.pad_token_id = tokenizer.pad_token_id
    if train_type == "full":
        return model
    if train_type == "freeze":
        model = wrap_model(model, recipe)
        model.score.weight.requires_grad = True  # the new head always trains
        return model
    if train_type == "qlora":
        raise SnaketuneError("stage rm does not support train_type qlora: use lora, or full")
    if train_type not in LORA_TYPES:
        raise SnaketuneError(f"unknown train_type {train_type!r}: use full or one of {', '.join(LORA_TYPES)}")
    from peft import LoraConfig, get_peft_model

    # wrap_model's LoRA settings, for a sequence-classification task: the score head trains in full
    lora = recipe["lora"]
    config = LoraConfig(
        r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], target_modules=lora["target_modules"],
        modules_to_save=list(dict.fromkeys((lora.get("modules_to_save") or []) + ["score"])),
        use_dora=train_type == "dora", use_rslora=train_type == "rslora",
        init_lora_weights={"pissa": "pissa", "olora": "olora"}.get(train_type, True),
        task_type="SEQ_CLS",
    )
    return get_peft_model(model, config)


# -------------------------------------------------------------------------------------- evaluation


def completion_logps(model, tokenizer, prompts: list[list[dict]], completions: list[list[dict]],
                     batch_size: int = 32, as_trained: bool = False) -> list[float]:
    """Summed log-probability of each completion (assistant turn, end-of-turn marker included)
    given its chat prompt: the quantity whose chosen-minus-rejected difference DPO rewards.

    The whitespace a template puts after the end-of-turn marker (ChatML's newline) is left out,
    as SFT leaves it out of its labels; ``as_trained=True`` keeps it, as trl's trainers count it."""
    import torch

    seqs, starts = [], []
    for p, c in zip(prompts, completions):
        head = tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(p + c, tokenize=False)
        assert full.startswith(head), "chat template does not extend the prompt"
        h = tokenizer(head, add_special_tokens=False)["input_ids"]
        tail = full[len(head):] if as_trained else full[len(head):].rstrip()
        ids = h + tokenizer(tail, add_special_tokens=False)["input_ids"]
        seqs.append(ids)
        starts.append(len(h))
    out = []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(seqs), batch_size):
            chunk, st = seqs[i:i + batch_size], starts[i:i + batch_size]
            width = max(map(len, chunk))
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, s in enumerate(chunk):
                ids[j, :len(s)] = torch.tensor(s)
                mask[j, :len(s)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None].to(device))[..., 0]
            for j, s in enumerate(chunk):
                out.append(logp[j, st[j] - 1:len(s) - 1].sum().item())
    model.train(was_training)
    return out


def preference_accuracy(model, tokenizer, rows: list[dict]) -> dict:
    """Share of pairs whose chosen completion has the higher log-probability, and the mean margin."""
    prompts = [r["prompt"] for r in rows]
    chosen = completion_logps(model, tokenizer, prompts, [r["chosen"] for r in rows])
    rejected = completion_logps(model, tokenizer, prompts, [r["rejected"] for r in rows])
    margins = [c - r for c, r in zip(chosen, rejected)]
    return {"accuracy": sum(m > 0 for m in margins) / len(margins), "margin": sum(margins) / len(margins),
            "n": len(margins)}


def reward_accuracy(model, tokenizer, rows: list[dict], batch_size: int = 32) -> dict:
    """Pair accuracy of a reward model: share of pairs scored chosen > rejected."""
    from snaketune.rewards import chat_text, score_texts

    texts = lambda key: [chat_text(tokenizer, r["prompt"] + r[key]) for r in rows]  # noqa: E731
    chosen = score_texts(model, tokenizer, texts("chosen"), batch_size)
    rejected = score_texts(model, tokenizer, texts("rejected"), batch_size)
    margins = [c - r for c, r in zip(chosen, rejected)]
    return {"accuracy": sum(m > 0 for m in margins) / len(margins), "margin": sum(margins) / len(margins),
            "n": len(margins)}


# -------------------------------------------------------------------------------------------- main


def orpo_trainer_class(nll: str):
    """trl's ORPOTrainer, or (``orpo.nll: completion``, the default) one whose NLL term covers the
    chosen completion only, like CPO and SFT: trl 1.16 takes it over prompt and completion, which on a
    chat SFT model that never modelled prompts makes the NLL of the prompt dominate the loss."""
    from trl.experimental.orpo import ORPOTrainer

    if nll == "full":
        return ORPOTrainer
    if nll != "completion":
        raise SnaketuneError(f"unknown orpo.nll {nll!r}: use completion or full")

    class CompletionNLLORPOTrainer(ORPOTrainer):
        def concatenated_forward(self, model, batch):
            out = super().concatenated_forward(model, batch)
            # out[0]: mean per-token log-prob of each chosen completion (ORPO uses averages)
            return (*out[:4], -out[0].mean(), *out[5:])

    return CompletionNLLORPOTrainer


def counting_pair_tokens(trainer_class):
    """``trainer_class`` counting the non-padding tokens of the chosen and rejected sequences into
    ``state.num_input_tokens_seen``, as the other trainers count their batches: trl's ORPO/CPO batches
    have no ``input_ids`` for transformers to count, so their runs reported no tokens/s."""
    import torch

    class PairTokens(trainer_class):
        def _track_num_input_tokens(self, inputs):
            masks = [inputs[k] for k in ("chosen_attention_mask", "rejected_attention_mask") if k in inputs]
            if "input_ids" in inputs or len(masks) < 2 or self.args.include_num_input_tokens_seen == "no":
                return super()._track_num_input_tokens(inputs)
            seen = torch.as_tensor(sum(m.sum() for m in masks), device=self.args.device, dtype=torch.int64)
            self.state.num_input_tokens_seen += self.accelerator.gather(seen).sum().item()

    return PairTokens


def make_trainer(stage: str, model, processing_class, dataset, recipe: dict, common: dict, callbacks: list,
                 peft_config=None):
    """The trl trainer for ``stage`` with its config (common Trainer args + the stage's keys);
    ``processing_class``: the tokenizer, or a vision-language model's processor."""
    import warnings

    spec = STAGES[stage]
    extra = dict(recipe.get("trl_args", {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # experimental-API notices of ORPO/CPO
        Config = _symbol(spec.config)
        if stage == "orpo":
            Trainer = orpo_trainer_class(resolve("recipes.orpo", recipe.get("orpo", {}))["nll"])
        else:
            Trainer = _symbol(spec.trainer)
        if spec.pair_batches:
            Trainer = counting_pair_tokens(Trainer)
        config = Config(**common, **method_args(recipe, stage), **extra)
        kw = {"peft_config": peft_config} if peft_config is not None else {}
        with logprob_head(recipe, Trainer, model.config.get_text_config().vocab_size):
            return Trainer(model=model, args=config, train_dataset=dataset, processing_class=processing_class,
                           callbacks=callbacks, **kw)


def _symbol(spec: str):
    """The object a ``module:name`` string names (the registry's trainer and config classes)."""
    import importlib

    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def make_grpo_trainer(model, tokenizer, dataset, recipe: dict, common: dict, callbacks: list, peft_config=None):
    from snaketune.rewards import build_rewards, load_function

    variant, g = grpo_args(recipe)
    grpo = resolve("recipes.grpo", recipe.get("grpo", {}))
    funcs, weights = build_rewards(grpo["rewards"])
    tools = [load_function(t, "tool") for t in grpo.get("tools", [])]
    common = dict(common)
    # batch_size counts prompts per step; trl's batch counts completions
    common["per_device_train_batch_size"] = common["per_device_train_batch_size"] * g["num_generations"]
    extra = dict(recipe.get("trl_args", {}))
    if variant == "rloo":
        from trl import RLOOConfig as Config, RLOOTrainer as Trainer
    else:
        from trl import GRPOConfig as Config, GRPOTrainer as Trainer
    config = Config(**common, **g, reward_weights=weights, **extra)
    kw = {"peft_config": peft_config} if peft_config is not None else {}
    if tools:  # trl's tool-calling loop: parsed tool calls run, their results join the completion
        kw["tools"] = tools
    with logprob_head(recipe, Trainer, model.config.get_text_config().vocab_size):
        return variant, Trainer(model=model, reward_funcs=funcs, args=config, train_dataset=dataset,
                                processing_class=tokenizer, callbacks=callbacks, **kw)


def add_logits_lm_head(model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                       outputs: tuple[str, ...] = ("log_probs",)) -> None:
    """trl's ``add_fused_lm_head`` contract computed from the model's own logits.

    ``model(..., labels=labels, fused_lm_head=True)`` returns trl's ``FusedCausalLMOutput`` (per-token
    log-probabilities of the next-token labels and the fields in ``outputs``, zero where the label is
    -100); without ``fused_lm_head`` the forward is the model's. The logits are the model's own, so
    its logit scaling and soft-capping apply; they are taken in fp32 (``cast_lm_head_to_fp32`` is
    therefore always true here).
    """
    import types

    import torch
    from trl.trainer.utils import FusedCausalLMOutput

    original = model.forward
    config = model.config.get_text_config()

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kw):
        if not fused_lm_head:
            kw.update({k: v for k, v in (("labels", labels), ("shift_labels", shift_labels),
                                         ("num_items_in_batch", num_items_in_batch)) if v is not None})
            return original(*args, **kw)
        kw["use_cache"] = False
        if getattr(config, "output_router_logits", False):
            kw.setdefault("output_router_logits", True)
        out = original(*args, **kw)
        logits = out.logits if shift_labels is not None else out.logits[:, :-1]
        labels = shift_labels if shift_labels is not None else labels[:, 1:]
        mask = labels != -100
        # only the scored positions (completions) go through the softmax, as trl's head does on GPUs
        scored = logits[mask].float()
        if temperature != 1.0:
            scored = scored / temperature
        lse = scored.logsumexp(-1)
        target = labels[mask]
        per_token = {"log_probs": scored.gather(-1, target.unsqueeze(-1)).squeeze(-1) - lse}
        with torch.no_grad():
            logp = scored.detach() - lse.detach().unsqueeze(-1)
            if "entropy" in outputs:
                per_token["entropy"] = -(logp.exp() * logp).sum(-1)
            if "log_sum_sq_probs" in outputs:
                per_token["log_sum_sq_probs"] = (2 * logp).logsumexp(-1)
            if "mean_logits" in outputs:
                per_token["mean_logits"] = scored.detach().mean(-1)
            if "is_top1" in outputs:
                per_token["is_top1"] = scored.detach().argmax(-1) == target
        per_token = {k: v.new_zeros(mask.shape).masked_scatter(mask, v) for k, v in per_token.items()}
        log_probs = per_token["log_probs"]
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        aux = getattr(out, "aux_loss", None)
        if aux is not None:
            loss = loss + getattr(config, "router_aux_loss_coef", 0.0) * aux
        return FusedCausalLMOutput(loss=loss, label_mask=mask, aux_loss=aux, **per_token)

    model.forward = types.MethodType(forward, model)


def cache_package_lookups() -> None:
    """accelerate asks importlib.metadata whether peft is installed (about 2 ms each time) twice in
    every step of trl's DPO/KTO (``is_peft_model``); the answer cannot change while a run lasts."""
    import functools

    import accelerate.utils.imports as imports

    if not hasattr(imports._is_package_available, "cache_info"):
        imports._is_package_available = functools.cache(imports._is_package_available)


def logprob_head_kind(recipe: dict, cuda: bool) -> str:
    """``fused`` or ``logits``: the recipe's ``logprob_head`` with ``auto`` decided by the device."""
    kind = recipe["logprob_head"]
    return ("fused" if cuda else "logits") if kind == "auto" else kind


@contextlib.contextmanager
def logprob_head(recipe: dict, trainer_class, vocab_size: int):
    """While ``trainer_class`` is built: its LM head for per-token log-probabilities.

    ``logits`` swaps trl's ``add_fused_lm_head`` for :func:`add_logits_lm_head` in the modules of the
    trainer's classes. ``fused`` keeps trl's head with tiles of at most the (128-rounded) vocabulary:
    trl 1.16 allocates a ``tokens x 32768`` buffer per call whatever the vocabulary (on CPU with a
    small vocabulary that allocation dominated the step: 0.45 -> 0.1 s/step for DPO on the tiny model).
    """
    import torch
    import trl.trainer.utils as tu

    if logprob_head_kind(recipe, torch.cuda.is_available()) == "fused":
        tu._CHUNKED_LOGPROB_CHUNK_SIZE = min(32768, -(-vocab_size // 128) * 128)
        yield
        return
    users = {sys.modules[c.__module__] for c in trainer_class.__mro__}
    users = [m for m in users if getattr(m, "add_fused_lm_head", None) is tu.add_fused_lm_head]
    for module in users:
        module.add_fused_lm_head = add_logits_lm_head
    try:
        yield
    finally:
        for module in users:
            module.add_fused_lm_head = tu.add_fused_lm_head


def align(base: str, data: list[str], recipe: dict, out: str, checkpoints: str | None = None, run=None,
          model_name: str | None = None, recipe_name: str | None = None) -> dict:
    """Align ``base`` on ``data`` with ``recipe``; write the adapter/model folder ``out``
    (training.json names ``model_name`` and ``recipe_name``, as the workflow does).

    Returns the summary written to ``out/training.json``.
    """
    stage = recipe.get("stage")  # required, no default: start() resolves the rest
    if stage not in ALIGN_STAGES:
        raise SnaketuneError(f"unknown alignment stage {stage!r}: use one of {', '.join(ALIGN_STAGES)} "
                             "(pt and sft are the train step)")
    files = [Path(d) / STAGES[stage].data for d in data]
    with_images = vision.check_model(base, files)  # rows with images need a vision-language base
    if with_images and stage != "dpo":
        raise SnaketuneError(f"{', '.join(map(str, files))}: rows with images, but stage {stage!r} trains on text "
                             "only: image+text pairs train with stage dpo (and SFT rows with stage sft)")
    setup = start(base, data, recipe, out, checkpoints)
    recipe, tokenizer, cuda = setup.recipe, setup.tokenizer, setup.cuda
    rows = load_rows(data, stage)
    if recipe.get("system"):  # the recipe's system prompt for conversations that have none
        for r in rows:
            if not r["prompt"] or r["prompt"][0]["role"] != "system":
                r["prompt"] = [{"role": "system", "content": recipe["system"]}] + r["prompt"]
    n_images = sum(len(r.get("images", [])) for r in rows)
    print(f"data: {len(rows)} {stage} rows{f' with {n_images} images' if with_images else ''} from "
          f"{', '.join(map(str, data))}", flush=True)
    from datasets import Dataset

    processing = tokenizer
    if with_images:  # trl's vision DPO: the processor renders images into the prompts, batch by batch
        rows, processing = vision.preference_rows(rows), vision.processor(base, tokenizer)
    dataset = Dataset.from_list(pretemplate(rows, tokenizer) if STAGES[stage].pretemplate else rows)
    peft_config = None
    if stage == "rm":
        model = load_reward_backbone(base, recipe, tokenizer, setup.dtype)
    else:
        model, peft_config = load_policy(base, recipe, setup.dtype, STAGES[stage].reference)
    initial_adapter = keep_initial_adapter(model, recipe, setup.checkpoints)  # PiSSA/OLoRA only

    steps = total_steps(recipe, len(rows), setup.world)
    common = _common_args(recipe, setup.checkpoints, cuda, setup.dtype_name, steps)
    preempted = Preempted()
    progress = make_callback(AliasedRun(run), preempted, steps)
    variant = None
    if stage == "grpo":
        variant, trainer = make_grpo_trainer(model, tokenizer, dataset, recipe, common, [progress], peft_config)
    else:
        trainer = make_trainer(stage, model, processing, dataset, recipe, common, [progress], peft_config)
    if with_images:  # checkpoints and the output hold the tokenizer and the image processor, as SFT's
        trainer.processing_class = tokenizer  # do (the assembled processor has no class a folder could name)
    trainable, total = parameter_counts(trainer.model)
    cache_package_lookups()
    result, resume, seconds = run_trainer(
        trainer, setup.checkpoints, preempted, cuda,
        f"aligning {stage}{'/' + variant if variant else ''}/{recipe.get('train_type', 'lora')}: {trainable:,} of {total:,} "
        f"parameters trainable, {steps} steps, batch {recipe['batch_size']}x{recipe['gradient_accumulation_steps']}"
        f"x{setup.world}, {setup.dtype_name}, reference: {reference_kind(stage, recipe, variant)}",
        recipe, recipe_name)

    summary = {
        **record_names(model_name, recipe_name),
        "stage": stage,
        "grpo_variant": variant,
        "train_type": recipe.get("train_type", "lora"),
        "reference": reference_kind(stage, recipe, variant),
        "logprob_head": logprob_head_kind(recipe, cuda) if STAGES[stage].logprob_head else None,
        **run_record(trainer, result, resume, seconds, progress, cuda, setup.dtype_name),
        "data": {"rows": len(rows), **({"images": n_images} if with_images else {})},
    }
    logged = [h for h in trainer.state.log_history if "loss" in h]
    for key in ("rewards/margins", "rewards/accuracies", "margin", "accuracy", "reward", "kl"):
        values = [h[key] for h in logged if key in h]
        if values:
            summary[f"first_{key}"], summary[f"final_{key}"] = values[0], values[-1]
    if "ref" in getattr(trainer.model, "peft_config", {}):  # trl's frozen copy of the initial adapter
        trainer.model.delete_adapter("ref")
    # the full model is saved in its base's dtype; shards gathered, rank 0 renames into place
    save(trainer, tokenizer, summary, Path(out), initial_adapter, saved_dtype(base, recipe),
         processing.image_processor if with_images else None)
    drop_checkpoints(trainer, setup.checkpoints, recipe)
    return summary


def reference_kind(stage: str, recipe: dict, variant: str | None) -> str:
    lora = recipe.get("train_type", "lora") in LORA_TYPES
    if not STAGES[stage].reference:
        return "none (reference-free)"
    if stage == "grpo":
        if grpo_args(recipe)[1]["beta"] == 0:
            return "none (beta 0)"
    if not lora:
        return "frozen copy of the starting model"
    if recipe.get("train_type", "lora") in ZERO_INIT_LORA:
        return "base with the adapter disabled"
    return "base with a frozen copy of the initial adapter"


@cli
def main(argv=None):
    ap = step_parser("python -m snaketune.align", __doc__, "accepted for the train rule's command line; unused (trl tokenizes)")
    args = ap.parse_args(argv)
    recipe = resolve("recipes", json.loads(args.params))
    from snaketune.tracking import step_run

    with step_run("align", recipe, tracking_resume(args.out, args.checkpoints, recipe, [args.base, *args.data])) as run:
        s = align(args.base, args.data, recipe, args.out, args.checkpoints, run, args.model_name, args.variant)
        run.log_metrics({k: v for k, v in s.items() if k.startswith(("first_", "final_")) or
                         k in ("train_loss", "tokens_per_s", "wall_seconds", "warmup_seconds", "steps",
                               "trainable_params", "gpu_peak_gib")})
        run.log_artifact(Path(args.out) / "training.json")
    print(f"aligned {s['stage']}{'/' + s['grpo_variant'] if s['grpo_variant'] else ''}/{s['train_type']}: {s['steps']} steps "
          f"in {s['wall_seconds']:.0f} s, loss {s['first_loss']:.3f} -> {s['final_loss']:.3f} -> {args.out}")


if __name__ == "__main__":
    main()
