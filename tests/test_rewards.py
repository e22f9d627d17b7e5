"""Reward functions of the GRPO family: built-ins, user functions by path, a reward model folder."""

import pytest

from snaketune.errors import SnaketuneError
from snaketune.schema import resolve
from snaketune.rewards import build_reward, build_rewards, exact_match, format_reward, length_penalty

PROMPTS = [[{"role": "user", "content": "What is 1+2?"}]] * 3
COMPLETIONS = [[{"role": "assistant", "content": "3"}], [{"role": "assistant", "content": " 3 \n"}],
               [{"role": "assistant", "content": "The answer is 4"}]]
ANSWERS = ["3", "3", "3"]


def test_builtins():
    assert exact_match(PROMPTS, COMPLETIONS, ANSWERS) == [1.0, 1.0, 0.0]
    assert exact_match(PROMPTS, ["3", "4", "3"], ANSWERS) == [1.0, 0.0, 1.0]  # plain-text completions
    assert format_reward(PROMPTS, COMPLETIONS) == [1.0, 1.0, 0.0]
    assert format_reward(PROMPTS, COMPLETIONS, pattern=r"The answer is \d+") == [0.0, 0.0, 1.0]
    assert length_penalty(PROMPTS, COMPLETIONS, target=4, per_char=0.5) == [0.0, 0.0, -5.5]


def test_config_entries_bind_their_keys_and_carry_names_and_weights():
    entries = [{"name": "exact_match"}, {"name": "format", "pattern": "x", "weight": 0.5}]
    funcs, weights = build_rewards(resolve("recipes.grpo", {"rewards": entries})["rewards"])  # weight: the schema's 1.0
    assert [f.__name__ for f in funcs] == ["exact_match", "format"] and weights == [1.0, 0.5]
    # trl calls with keyword columns and its own extras
    assert funcs[0](prompts=PROMPTS, completions=COMPLETIONS, answer=ANSWERS, trainer_state=None) == [1, 1, 0]
    assert funcs[1](prompts=PROMPTS, completions=[[{"role": "assistant", "content": "x"}]] * 3) == [1, 1, 1]


def test_user_function_by_path(tmp_path):
    src = tmp_path / "my_rewards.py"
    src.write_text("def shouty(prompts, completions, answer, bonus=0.0, **kwargs):\n"
                   "    return [float(c[0]['content'].strip() == a) + bonus for c, a in zip(completions, answer)]\n")
    fn = build_reward({"name": f"{src}:shouty", "bonus": 0.25, "weight": 2})
    assert fn.__name__ == "shouty"
    assert fn(prompts=PROMPTS, completions=COMPLETIONS, answer=ANSWERS, completion_ids=None) == [1.25, 1.25, 0.25]
    with pytest.raises(SnaketuneError, match="has no function 'nope'"):
        build_reward({"name": f"{src}:nope"})
    with pytest.raises(SnaketuneError, match="does not exist"):
        build_reward({"name": f"{tmp_path}/missing.py:f"})
    with pytest.raises(SnaketuneError, match="built-in"):
        build_reward({"name": "bleu"})
    with pytest.raises(SnaketuneError, match="empty"):
        build_rewards([])


def test_reward_model_folder_scores_prompt_plus_completion(tiny_model, tmp_path):
    """A sequence-classification folder (what stage rm writes for train_type full) is a reward; it
    scores the conversation up to the end-of-turn marker."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    fn = build_reward({"name": "reward_model", "path": str(tmp_path / "rm")})
    scores = fn(prompts=PROMPTS, completions=COMPLETIONS, answer=ANSWERS)
    text = tok.apply_chat_template(PROMPTS[0] + COMPLETIONS[2], tokenize=False)
    assert text.endswith("<|im_end|>\n")
    text = text[:-1]  # read at the end-of-turn marker, as the rm stage trains it
    with torch.no_grad():
        direct = model.eval()(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
    assert len(scores) == 3 and scores[2] == pytest.approx(direct, abs=1e-5)
    with pytest.raises(SnaketuneError, match="needs path"):
        build_reward({"name": "reward_model"})


def test_lora_reward_model_adapter_is_a_reward(tiny_model, tiny_data, tmp_path):
    """stage rm with LoRA writes a sequence-classification adapter (score head saved in full);
    the reward loads it onto its base."""
    from snaketune.align import align

    out = tmp_path / "rm"
    recipe = {"stage": "rm", "train_type": "lora", "learning_rate": 1e-3, "batch_size": 4, "max_steps": 2,
              "seed": 0}
    summary = align(str(tiny_model), [str(tiny_data)], recipe, str(out), str(tmp_path / "ckpt"))
    assert summary["reference"] == "none (reference-free)" and (out / "adapter_config.json").is_file()
    scores = build_reward({"name": "reward_model", "path": str(out)})(PROMPTS, COMPLETIONS)
    assert len(scores) == 3 and len(set(scores)) > 1
