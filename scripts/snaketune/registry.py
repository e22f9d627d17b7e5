"""What each training stage, train type and quantize method is: one entry each, read by the
workflow (config.smk, at parse time: no torch here) and by the steps. The schema's enums list
these keys (tests/test_registry.py)."""

from __future__ import annotations

from dataclasses import dataclass

FULL_TYPES = ("full", "freeze")
LORA_TYPES = ("lora", "qlora", "dora", "rslora", "pissa", "olora")


@dataclass(frozen=True)
class Stage:
    step: str  # the module that trains it: snaketune.train or snaketune.align
    rows: str  # the kind of rows it trains on (snaketune.data.kinds), checked before any job
    data: str  # the file it reads from every dataset folder
    trainer: str | None = None  # "module:Class" of the trl trainer (align) and its config
    config: str | None = None
    reference: bool = False  # trains against the starting model (grpo: when grpo.beta > 0)
    pretemplate: bool = False  # chat rows rendered to prompt/chosen/rejected text first
    pair_batches: bool = False  # batches of chosen/rejected masks without input_ids (tokens counted by align)
    logprob_head: bool = False  # scores tokens through trl's add_fused_lm_head (recipe key logprob_head)
    # align stages: the recipe's keys for the stage sit in a block named after it (``dpo: {beta: 0.1}``),
    # whose keys and defaults the schema owns (recipes.<stage>)


_PREF = dict(step="align", rows="preference", data="preference.jsonl")
_CPO = dict(trainer="trl.experimental.cpo:CPOTrainer", config="trl.experimental.cpo:CPOConfig",
            pretemplate=True, pair_batches=True)

STAGES = {
    "pt": Stage("train", "text", "pretrain.jsonl"),
    "sft": Stage("train", "chat", "train.jsonl"),
    "dpo": Stage(**_PREF, trainer="trl:DPOTrainer", config="trl:DPOConfig", reference=True, logprob_head=True),
    "kto": Stage("align", "kto", "kto.jsonl", trainer="trl:KTOTrainer", config="trl:KTOConfig", reference=True,
                 logprob_head=True),
    "orpo": Stage(**_PREF, trainer="trl.experimental.orpo:ORPOTrainer", config="trl.experimental.orpo:ORPOConfig",
                  pretemplate=True, pair_batches=True),
    "simpo": Stage(**_PREF, **_CPO),
    "cpo": Stage(**_PREF, **_CPO),
    "rm": Stage(**_PREF, trainer="trl:RewardTrainer", config="trl:RewardConfig", pretemplate=True),
    # grpo.variant rloo: trl:RLOOTrainer (align.make_grpo_trainer)
    "grpo": Stage("align", "chat", "train.jsonl", trainer="trl:GRPOTrainer", config="trl:GRPOConfig",
                  reference=True, logprob_head=True),
}


@dataclass(frozen=True)
class Method:
    library: str  # llmcompressor or bitsandbytes
    scheme: str  # recorded in quantization.json and the summary
    calibrated: bool = False  # calibrates on chat rows of the dataset's train.jsonl
    grouped: bool = False  # int4 weights in groups of group_size input columns


METHODS = {
    "fp8": Method("llmcompressor", "FP8_DYNAMIC (fp8 e4m3 weights per channel, dynamic per-token fp8 activations)"),
    "gptq": Method("llmcompressor", "W4A16 (int4 symmetric group weights, 16-bit activations)", True, True),
    "awq": Method("llmcompressor", "W4A16_ASYM (int4 asymmetric group weights, 16-bit activations)", True, True),
    "bnb-nf4": Method("bitsandbytes", "bitsandbytes nf4 (4-bit NormalFloat weights, double quantization)"),
    "bnb-int8": Method("bitsandbytes", "bitsandbytes LLM.int8 (int8 per-row weights)"),
}
