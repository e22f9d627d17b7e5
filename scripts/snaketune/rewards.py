"""Reward functions for the GRPO family (``stage: grpo``).

A recipe lists its rewards under ``grpo.rewards``; each entry has a ``name``, an optional
``weight`` (default 1.0) and the function's own keys::

    grpo:
      rewards:
        - {name: exact_match, weight: 1.0}
        - {name: format, pattern: '^-?\\d+$', weight: 0.2}
        - {name: length, target: 4, weight: 0.1}
        - {name: reward_model, path: results/tiny-qwen2/rm/model, weight: 0.5}
        - {name: rewards/mine.py:my_reward, weight: 1.0, scale: 2}

Signature of every reward function (the trl reward-function convention)::

    def my_reward(prompts, completions, answer, **kwargs) -> list[float]

- ``prompts``: one chat prompt per completion (a list of ``{"role", "content"}`` messages);
- ``completions``: one completion per item, as ``[{"role": "assistant", "content": "..."}]``;
- ``answer``: the reference answer of each prompt (the last assistant turn of the data row);
- ``kwargs``: the entry's own keys from the config (``scale`` above), and what trl passes
  (``completion_ids``, ``trainer_state``, ...) — accept ``**kwargs``.

Return one float per completion (``None`` for "not applicable"). The trainer sums the weighted
rewards and turns them into advantages within each group of ``num_generations`` completions.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path

from snaketune.errors import SnaketuneError


def text_of(completion) -> str:
    """The text of one completion, conversational (list of messages) or plain."""
    if isinstance(completion, list):
        return "".join(m.get("content") or "" for m in completion if m.get("role", "assistant") == "assistant")
    return str(completion)


def exact_match(prompts, completions, answer, **kwargs) -> list[float]:
    """1.0 where the completion, stripped, equals the reference answer, else 0.0."""
    return [float(text_of(c).strip() == str(a).strip()) for c, a in zip(completions, answer)]


def format_reward(prompts, completions, pattern: str = r"^-?\d+$", **kwargs) -> list[float]:
    """1.0 where the whole stripped completion matches the regular expression ``pattern``."""
    rx = re.compile(pattern, re.DOTALL)
    return [float(bool(rx.fullmatch(text_of(c).strip()))) for c in completions]


def length_penalty(prompts, completions, target: int = 0, per_char: float = 0.01, **kwargs) -> list[float]:
    """``-per_char`` for every character beyond ``target`` (0: no penalty up to ``target``)."""
    return [-per_char * max(0, len(text_of(c)) - target) for c in completions]


BUILTINS = {"exact_match": exact_match, "format": format_reward, "length": length_penalty}


def load_function(spec: str, kind: str = "reward"):
    """``path/to/file.py:function`` -> the function (the file is imported by path); ``kind`` names
    what it is for in the errors (a reward, a GRPO tool)."""
    path, _, name = spec.rpartition(":")
    if not path.endswith(".py") or not name:
        hint = f"a built-in ({', '.join(BUILTINS)}, reward_model) or " if kind == "reward" else ""
        raise SnaketuneError(f"{kind} {spec!r}: use {hint}path/to/file.py:function")
    file = Path(path)
    if not file.is_file():
        raise SnaketuneError(f"{kind} {spec!r}: {file} does not exist (relative paths are from the working directory)")
    module_spec = importlib.util.spec_from_file_location(f"snaketune_{kind}_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise SnaketuneError(f"{kind} {spec!r}: {file} has no function {name!r}")
    return fn


def score_texts(model, tokenizer, texts: list[str], batch_size: int = 32) -> list[float]:
    """Scores of a sequence-classification reward model for full chat texts."""
    import torch

    out = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, padding_side="right",
                            add_special_tokens=False).to(device)
            out += model(**enc).logits[:, 0].float().tolist()
    return out


def load_reward_model(path: str):
    """Model and tokenizer of an ``rm`` result: a sequence-classification folder or a PEFT adapter."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise SnaketuneError(f"reward model {folder} does not exist: train it with a recipe of stage rm")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if (folder / "adapter_config.json").is_file():
        from peft import AutoPeftModelForSequenceClassification

        model = AutoPeftModelForSequenceClassification.from_pretrained(folder, num_labels=1).merge_and_unload()
    else:
        model = AutoModelForSequenceClassification.from_pretrained(folder)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def chat_text(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> str:
    """A conversation as the reward model reads it: the chat template's text up to the last
    end-of-turn marker (where generation stops; ChatML's trailing newline is left out)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, **({"tools": tools} if tools else {}))
    eos = tokenizer.eos_token or ""
    return text.rstrip() if eos and text.rstrip().endswith(eos) else text


def reward_model(path: str, batch_size: int = 32):
    """A reward function scoring ``prompt + completion`` with the reward model at ``path``."""
    model, tokenizer = load_reward_model(path)

    def reward_model_score(prompts, completions, **kwargs) -> list[float]:
        texts = []
        for p, c in zip(prompts, completions):
            if isinstance(p, list):
                c = c if isinstance(c, list) else [{"role": "assistant", "content": str(c)}]
                texts.append(chat_text(tokenizer, p + c))
            else:
                texts.append(str(p) + text_of(c))
        return score_texts(model, tokenizer, texts, batch_size)

    return reward_model_score


def build_reward(entry: dict):
    """One config entry -> a reward function named after the entry (trl logs ``rewards/<name>``)."""
    entry = dict(entry)
    name = entry.pop("name", None)
    entry.pop("weight", None)
    if not name:
        raise SnaketuneError(f"reward entry {entry} has no name")
    if name == "reward_model":
        if "path" not in entry:
            raise SnaketuneError("reward reward_model needs path: the folder of an rm-stage result")
        fn, label = reward_model(entry.pop("path"), entry.pop("batch_size", 32)), "reward_model"
    elif name in BUILTINS:
        fn, label = BUILTINS[name], name
    else:
        fn, label = load_function(name), name.rpartition(":")[2]
    bound = functools.partial(fn, **entry) if entry else fn

    @functools.wraps(fn)
    def reward(prompts, completions, **kwargs):
        return bound(prompts, completions, **kwargs)

    reward.__name__ = label
    return reward


def build_rewards(entries: list[dict]) -> tuple[list, list[float]]:
    """Reward functions and their weights from the ``grpo.rewards`` list (schema-resolved: each has a weight)."""
    if not entries:
        raise SnaketuneError("grpo.rewards is empty: name at least one reward (e.g. exact_match)")
    return [build_reward(e) for e in entries], [float(e["weight"]) for e in entries]
