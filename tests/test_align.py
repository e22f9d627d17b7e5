"""The align step: DPO/KTO/ORPO/SimPO/CPO, reward models and the GRPO family on the tiny task.

Two full-FT SFT models on sums of 0..19 are trained once per module: `sft_model` (32 wide, 500
steps, ~25% greedy exact match: headroom for GRPO's reward) and `pref_sft` (64 wide, 4 layers,
600 steps), the start of the preference methods and the reward model, whose outcomes must hold
under every CPU capability and seed (issue 18). Runs are short and single-threaded.
"""

import json
import math
import shutil
from pathlib import Path

import pytest

from conftest import LEARNING_SEED, read_jsonl as read, record_learning
from snaketune.align import align, completion_logps, preference_accuracy, reward_accuracy
from snaketune.data import addition_pairs
from snaketune.errors import SnaketuneError
from snaketune.schema import resolve
from snaketune.tracking import MemoryRun

def heldout(data_dir):
    """Preference pairs on the held-out sums: the right answer against each kind of wrong one."""
    return addition_pairs(read(data_dir / "test.jsonl"))


@pytest.fixture(scope="module")
def arith(tmp_path_factory):
    from snaketune.data import prepare

    out = tmp_path_factory.mktemp("align-data") / "arith20"
    prepare({"source": "synthetic", "max_operand": 20, "n_test": 40, "seed": 0}, out)
    return out


def full_sft(base, data, out, **keys):
    """A starting model of the fixtures: full SFT of ``base`` on ``data`` (48-token rows, batch 16)."""
    from snaketune.train import train

    recipe = {"stage": "sft", "train_type": "full", "batch_size": 16, "max_length": 48, "logging_steps": 100,
              "save_steps": 10000, "seed": LEARNING_SEED, **keys}
    train(str(base), [str(data)], recipe, str(out), str(out.with_name("ckpt")), MemoryRun())
    return out


@pytest.fixture(scope="module")
def sft_model(tiny_model, arith, tmp_path_factory):
    return full_sft(tiny_model, arith, tmp_path_factory.mktemp("align-sft") / "sft",
                    learning_rate=5e-3, lr_scheduler="constant", max_steps=500)


@pytest.fixture(scope="module")
def pref_sft(arith, tmp_path_factory):
    """The start of the preference methods: a wider tiny model (64 wide, 4 layers), SFT 600 steps
    with a cosine schedule, that ranks ~97% of held-out pairs right. The 32-wide fixture above is
    too chaotic for them: its start (0.63-0.80 held-out pair accuracy) and every method's change
    of it (-0.07..+0.07) moved with the CPU capability and the seed (issue 18)."""
    from snaketune.model import fetch

    from conftest import TINY

    base = tmp_path_factory.mktemp("models") / "tiny64"
    fetch({**TINY, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 4}, base)
    return full_sft(base, arith, tmp_path_factory.mktemp("align-pref-sft") / "sft",
                    learning_rate=2e-3, lr_scheduler="cosine", max_steps=600)


@pytest.fixture(scope="module")
def start(pref_sft, arith):
    """Held-out preference accuracy and margin of the preference methods' start."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pref_sft)
    return preference_accuracy(AutoModelForCausalLM.from_pretrained(pref_sft), tok, heldout(arith))


def load_policy(out, base):
    from transformers import AutoModelForCausalLM

    if (out / "adapter_config.json").is_file():
        from peft import PeftModel

        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)
    return AutoModelForCausalLM.from_pretrained(out)


def mean(xs):
    return sum(xs) / len(xs)


# key parameters per method: 100 steps, lr 1e-4, full fine-tuning, from `pref_sft`.
METHODS = {
    "dpo": {"dpo": {"beta": 0.5}},
    "kto": {"kto": {"beta": 0.5}},
    "orpo": {"orpo": {"beta": 0.1}},
    "simpo": {"simpo": {"beta": 2.0, "simpo_gamma": 0.5}},
    "cpo": {"cpo": {"beta": 0.1}},
}


@pytest.mark.learning
@pytest.mark.parametrize("stage", list(METHODS))
def test_preference_method_raises_heldout_margins(stage, pref_sft, arith, start, tmp_path):
    """Every method widens the log-probability margin of right over wrong answers on held-out sums
    (pairs it never trained on): by 0.27-1.47 nats over seeds 0-2 x ATEN_CPU_CAPABILITY
    default/avx2/avx512 (benchmarks/results/robustness.json), asserted > 0.1.

    Held-out pair *accuracy* is printed, not asserted: from a start near 0.97 it moves by -0.10..+0.01,
    and from a weaker start (0.63-0.80) by -0.07..+0.07 with the machine: on this task no method
    raises it reliably (each wrong answer is a near miss: 1, 2 or 10 off)."""
    from transformers import AutoTokenizer

    run = MemoryRun()
    recipe = {"stage": stage, "train_type": "full", "learning_rate": 1e-4, "lr_scheduler": "constant",
              "batch_size": 16, "max_steps": 100, "logging_steps": 10, "seed": LEARNING_SEED, **METHODS[stage]}
    out = tmp_path / "out"
    align(str(pref_sft), [str(arith)], recipe, str(out), str(tmp_path / "ckpt"), run)
    after = preference_accuracy(load_policy(out, pref_sft), AutoTokenizer.from_pretrained(out), heldout(arith))
    print(f"{stage}: held-out preference accuracy {start['accuracy']:.3f} -> {after['accuracy']:.3f}, "
          f"margin {start['margin']:.2f} -> {after['margin']:.2f}; logged reward margin "
          f"{run.metrics['margins'][0]:.3f} -> {run.metrics['margins'][-1]:.3f}")
    record_learning(f"{stage} held-out margin gain", after["margin"] - start["margin"], 0.1)
    assert after["margin"] > start["margin"] + 0.1
    for key in ("loss", "rewards/chosen", "rewards/rejected", "margins", "learning_rate"):
        assert len(run.metrics[key]) == 10, key
    assert len(run.metrics["accuracies" if stage != "kto" else "kl"]) == 10
    written = json.loads((out / "training.json").read_text())
    assert written["steps"] == 100 and written["stage"] == stage and written["final_loss"] < written["first_loss"]


@pytest.mark.parametrize("head", ["fused", "logits"])
def test_dpo_loss_matches_an_independent_computation(head, sft_model, arith, tmp_path):
    """trl's DPO loss on a fixed batch equals -logsigmoid(beta * (policy - reference log-ratio margin))
    computed here from summed completion log-probs, with either log-prob head; the policy is a LoRA
    adapter with random weights and the reference is the SFT model loaded separately (what the
    disabled adapter must reproduce)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from snaketune.align import _common_args, load_policy, make_trainer

    tok = AutoTokenizer.from_pretrained(sft_model)
    rows = read(arith / "preference.jsonl")[:6]
    recipe = resolve("recipes", {"stage": "dpo", "train_type": "lora", "dpo": {"beta": 0.3}, "learning_rate": 5e-6,
                                 "batch_size": 6, "max_steps": 1, "logprob_head": head})
    model, peft_config = load_policy(str(sft_model), recipe, torch.float32)
    common = _common_args(recipe, tmp_path / "ckpt", False, "fp32", 1)
    trainer = make_trainer("dpo", model, tok, Dataset.from_list(rows), recipe, common, [], peft_config)
    policy = trainer.model
    # LoRA: the reference is the adapter-disabled base: no reference model, no reference adapter
    assert trainer.ref_model is None and list(policy.peft_config) == ["default"]
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch).item()

    prompts = [r["prompt"] for r in rows]
    ref = AutoModelForCausalLM.from_pretrained(sft_model)
    pc, pr = (completion_logps(policy, tok, prompts, [r[k] for r in rows], as_trained=True) for k in ("chosen", "rejected"))
    rc, rr = (completion_logps(ref, tok, prompts, [r[k] for r in rows], as_trained=True) for k in ("chosen", "rejected"))
    margins = [(a - b) - (c - d) for a, b, c, d in zip(pc, rc, pr, rr)]
    expected = mean([-math.log(1 / (1 + math.exp(-0.3 * m))) for m in margins])
    assert abs(expected - math.log(2)) > 1e-3  # the check is not the trivial policy == reference case
    assert loss == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_logits_head_gives_what_trls_fused_head_gives(sft_model, arith):
    """``logprob_head: logits`` (the CPU default) returns trl's fused head's per-token log-probs,
    entropy, mean logits, top-1 flags, log sum p^2 and loss, and the same gradients, on padded
    rows with prompt positions masked; without ``fused_lm_head`` the forward is the model's."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from snaketune.align import add_logits_lm_head

    outputs = ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")
    fused, logits = (AutoModelForCausalLM.from_pretrained(sft_model) for _ in range(2))
    add_fused_lm_head(fused, temperature=0.7, outputs=outputs)
    add_logits_lm_head(logits, temperature=0.7, outputs=outputs)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, fused.config.vocab_size, (4, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100  # the prompt
    got = [m(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True) for m in (fused, logits)]
    for field in (*outputs, "label_mask"):
        a, b = getattr(got[0], field), getattr(got[1], field)
        assert a.shape == b.shape, field
        assert torch.allclose(a.float(), b.float(), atol=1e-5), (field, (a.float() - b.float()).abs().max())
    assert got[0].loss.item() == pytest.approx(got[1].loss.item(), abs=1e-6)
    for out in got:
        out.loss.backward()
    for (name, a), (_, b) in zip(fused.named_parameters(), logits.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name
    plain = AutoModelForCausalLM.from_pretrained(sft_model)
    assert torch.equal(logits(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_alignment_keeps_gradient_checkpointing_off_unless_asked(sft_model, arith, tmp_path):
    """trl's configs default to gradient checkpointing on; a recipe's ``gradient_checkpointing: false``
    (the schema default) must reach them: DPO ran every step with checkpointing (the backward
    recomputed the forward: 41 vs 23 ms a step on the parity study)."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer

    from snaketune.align import _common_args, load_policy, make_trainer

    tok = AutoTokenizer.from_pretrained(sft_model)
    rows = read(arith / "preference.jsonl")[:4]
    for asked in (False, True):
        recipe = resolve("recipes", {"stage": "dpo", "train_type": "full", "batch_size": 4, "max_steps": 1,
                                     "gradient_checkpointing": asked})
        model, _ = load_policy(str(sft_model), recipe, torch.float32)
        trainer = make_trainer("dpo", model, tok, Dataset.from_list(rows), recipe,
                               _common_args(recipe, tmp_path / f"ckpt-{asked}", False, "fp32", 1), [])
        assert trainer.args.gradient_checkpointing is asked
        assert trainer.model.is_gradient_checkpointing is asked


def test_lora_dpo_from_the_cli_logs_to_mlflow(sft_model, arith, tmp_path):
    """``python -m snaketune.align`` (in-process): adapter folder, training.json, metrics per step."""
    import mlflow
    from peft import PeftConfig

    from snaketune.align import main

    out = tmp_path / "adapter"
    recipe = {"stage": "dpo", "train_type": "lora", "learning_rate": 5e-3, "batch_size": 8, "max_steps": 6,
              "logging_steps": 2, "dpo": {"beta": 0.1, "loss_type": "ipo"}, "seed": 0}
    main(["--base", str(sft_model), "--data", str(arith), "--params", json.dumps(recipe), "--out", str(out),
          "--cache-dir", str(tmp_path / "cache"), "--model-name", "tiny", "--variant", "dpo"])
    assert PeftConfig.from_pretrained(out).peft_type == "LORA"
    written = json.loads((out / "training.json").read_text())
    assert (written["model"], written["variant"], written["recipe"]) == ("tiny", "dpo", "dpo")  # as the rule names it
    assert written["reference"] == "base with the adapter disabled" and written["steps"] == 6
    client = mlflow.tracking.MlflowClient()
    (run,) = mlflow.search_runs(experiment_names=["test"], output_format="list")
    assert run.data.tags["snaketune.step"] == "align"
    for key in ("loss", "rewards/chosen", "rewards/rejected", "margins", "accuracies"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 3, key


@pytest.mark.learning
def test_reward_model_ranks_heldout_pairs(pref_sft, arith, tmp_path):
    """stage rm: a sequence-classification model whose score ranks held-out pairs well above chance,
    usable as a GRPO reward. The score reads the last token (the end-of-turn marker, rows rendered up
    to it, as the reward function reads generated answers), so the model has to check the sum there:
    it starts from `pref_sft` and trains on every kind of wrong answer of each training sum.
    lr 3e-4: 0.74-0.89 held-out over seeds 0-2 x capabilities; at 1e-3 it did not even fit its
    training pairs on some machines (held-out 0.56-0.74)."""
    from snaketune.rewards import build_reward, load_reward_model

    pairs = tmp_path / "pairs"  # every kind of wrong answer for each training sum
    pairs.mkdir()
    (pairs / "preference.jsonl").write_text("".join(json.dumps(p) + "\n" for p in addition_pairs(read(arith / "train.jsonl"))))
    run = MemoryRun()
    recipe = {"stage": "rm", "train_type": "full", "learning_rate": 3e-4, "batch_size": 16, "max_steps": 1000,
              "weight_decay": 0.1, "logging_steps": 50, "seed": LEARNING_SEED}
    out = tmp_path / "rm"
    align(str(pref_sft), [str(pairs)], recipe, str(out), str(tmp_path / "ckpt"), run)
    model, tok = load_reward_model(out)
    acc = reward_accuracy(model, tok, heldout(arith))
    print(f"rm: held-out pair accuracy {acc['accuracy']:.3f}, margin {acc['margin']:.3f}; logged "
          f"accuracy {run.metrics['accuracies'][0]:.3f} -> {run.metrics['accuracies'][-1]:.3f}")
    record_learning("rm held-out pair accuracy", acc["accuracy"], 0.65)
    assert acc["accuracy"] >= 0.65
    assert "margins" in run.metrics and "loss" in run.metrics
    reward = build_reward({"name": "reward_model", "path": str(out)})
    case = heldout(arith)[0]
    good, bad = reward([case["prompt"]] * 2, [case["chosen"], case["rejected"]])
    assert isinstance(good, float) and isinstance(bad, float)


def grpo_recipe(variant, steps, **grpo):
    return {"stage": "grpo", "train_type": "full", "learning_rate": 3e-3, "batch_size": 8, "max_steps": steps,
            "logging_steps": 1, "seed": LEARNING_SEED,
            "grpo": {"variant": variant, "num_generations": 8, "max_completion_length": 6, "temperature": 1.0,
                     **grpo}}


@pytest.mark.learning
def test_grpo_exact_match_reward_rises(sft_model, arith, tmp_path):
    """GRPO on 16 training prompts of the tiny task: the SFT model samples the right sum 0.21-0.46 of
    the time (first 10 steps); after 80 steps the last 10 average 0.71-0.87, a gain of 0.25-0.60 over
    seeds 0-2 x ATEN_CPU_CAPABILITY default/avx2/avx512 (2026-12-06, Intel Xeon; asserted > 0.15).
    40 steps gained only 0.17 on one of those nine (default, seed 2)."""
    data = tmp_path / "small"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(open(arith / "train.jsonl").readlines()[:16]))
    run = MemoryRun()
    recipe = {**grpo_recipe("grpo", 80), "lr_scheduler": "cosine"}
    summary = align(str(sft_model), [str(data)], recipe, str(tmp_path / "out"), str(tmp_path / "ckpt"), run)
    reward = run.metrics["reward"]
    print(f"grpo: exact-match reward, first 10 steps {mean(reward[:10]):.3f} -> last 10 {mean(reward[-10:]):.3f}")
    record_learning("grpo exact-match reward gain", mean(reward[-10:]) - mean(reward[:10]), 0.15)
    assert mean(reward[-10:]) > mean(reward[:10]) + 0.15
    assert len(run.metrics["kl"]) == 80 and summary["reference"] == "frozen copy of the starting model"


@pytest.mark.parametrize("variant", ["dapo", "dr_grpo", "bnpo", "gspo", "cispo", "sapo", "luspo", "vespo", "rloo",
                                     "reinforce++"])
def test_grpo_variant_runs_and_logs(variant, sft_model, arith, tmp_path):
    """Each GRPO-family variant runs a few steps (LoRA, so the reference is the disabled adapter)
    with a weighted mix of rewards, logs its metrics and writes an adapter."""
    src = tmp_path / "r.py"
    src.write_text("def short(prompts, completions, answer, **kw):\n"
                   "    return [-len(c[0]['content']) / 10 for c in completions]\n")
    run = MemoryRun()
    rewards = [{"name": "exact_match"}, {"name": "format", "weight": 0.5}, {"name": f"{src}:short", "weight": 0.1}]
    recipe = {**grpo_recipe(variant, 3, num_generations=4, max_completion_length=4, rewards=rewards,
                            **({"beta": 0.04} if variant in ("dapo", "gspo") else {})),
              "batch_size": 2, "train_type": "lora", "learning_rate": 1e-3}
    out = tmp_path / "out"
    summary = align(str(sft_model), [str(arith)], recipe, str(out), str(tmp_path / "ckpt"), run)
    assert summary["steps"] == 3 and summary["grpo_variant"] == variant and (out / "adapter_config.json").is_file()
    for key in ("loss", "reward", "kl", "rewards/exact_match/mean", "rewards/short/mean", "completions/mean_length"):
        assert len(run.metrics[key]) == 3, key


def test_recipe_errors_name_the_key(sft_model, arith, tmp_path):
    with pytest.raises(SnaketuneError, match="unknown alignment stage 'ppo'"):
        align(str(sft_model), [str(arith)], {"stage": "ppo"}, str(tmp_path / "o"))
    with pytest.raises(SnaketuneError, match="unknown grpo.variant 'ppo'"):
        align(str(sft_model), [str(arith)], {"stage": "grpo", "learning_rate": 1e-4, "grpo": {"variant": "ppo"}}, str(tmp_path / "o"))
    with pytest.raises(SnaketuneError, match="unknown grpo key"):
        align(str(sft_model), [str(arith)], {"stage": "grpo", "learning_rate": 1e-4, "grpo": {"group_size": 4}}, str(tmp_path / "o"))
    with pytest.raises(SnaketuneError, match="kto.jsonl does not exist"):
        align(str(sft_model), [str(tmp_path)], {"stage": "kto"}, str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("train_type", ["dora", "pissa"])
def test_lora_family_reference_and_resume(train_type, sft_model, arith, tmp_path):
    """DoRA trains against the adapter-disabled base; PiSSA (which rewrites the base weights) against
    a frozen copy of its initial adapter, which is not saved. A rerun resumes from the checkpoint."""
    recipe = {"stage": "dpo", "train_type": train_type, "learning_rate": 1e-3, "batch_size": 4, "max_steps": 3,
              "save_steps": 1, "logging_steps": 1, "seed": 0, "keep_checkpoints": True}
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    first = align(str(sft_model), [str(arith)], recipe, str(out), str(ckpt), MemoryRun())
    assert first["reference"] == {"dora": "base with the adapter disabled",
                                  "pissa": "base with a frozen copy of the initial adapter"}[train_type]
    assert not (out / "ref").exists() and (out / "adapter_config.json").is_file()
    # PiSSA is saved converted, as a plain LoRA (rank 2r) for the original base
    assert json.loads((out / "adapter_config.json").read_text())["r"] == {"dora": 8, "pissa": 16}[train_type]
    shutil.rmtree(ckpt / "checkpoint-3")  # as if the job had been killed before its last checkpoint
    again = align(str(sft_model), [str(arith)], recipe, str(tmp_path / "out2"), str(ckpt), MemoryRun())
    assert again["resumed_from"].endswith("checkpoint-2") and again["steps"] == 3


@pytest.mark.parametrize("stage", ["orpo", "simpo", "cpo", "kto", "rm"])
def test_every_method_reports_tokens_per_s(stage, tiny_model, arith, tmp_path):
    """training.json's tokens and tokens/s, counted as train counts them (non-padding tokens of every
    sequence the model reads): trl's ORPO/CPO batches hold no input_ids, and their runs had none."""
    recipe = {"stage": stage, "train_type": "lora", "learning_rate": 5e-6, "batch_size": 4, "max_steps": 4,
              "logging_steps": 1, "seed": 0}
    summary = align(str(tiny_model), [str(arith)], recipe, str(tmp_path / "out"), str(tmp_path / "ckpt"))
    assert summary["tokens"] > 0 and summary["tokens_per_s"] > 0
    assert json.loads((tmp_path / "out/training.json").read_text())["tokens_per_s"] == summary["tokens_per_s"]


def test_a_resumed_alignment_counts_tokens_from_its_checkpoint(tiny_model, arith, tmp_path):
    """A resumed run's tokens are those of the whole run, as if it had not stopped, and its steady
    tokens/s is positive (DPO counted this session's tokens only: -600 tok/s after a resume)."""
    recipe = {"stage": "dpo", "train_type": "lora", "learning_rate": 5e-6, "batch_size": 4, "max_steps": 4,
              "save_steps": 2, "logging_steps": 1, "seed": 0, "keep_checkpoints": True}
    ckpt = tmp_path / "ckpt"
    first = align(str(tiny_model), [str(arith)], recipe, str(tmp_path / "out"), str(ckpt))
    shutil.rmtree(ckpt / "checkpoint-4")  # as if the job had been killed before its last checkpoint
    again = align(str(tiny_model), [str(arith)], recipe, str(tmp_path / "out2"), str(ckpt))
    assert again["resumed_from"].endswith("checkpoint-2")
    assert again["tokens"] == first["tokens"] > 0 and again["tokens_per_s"] > 0


@pytest.mark.parametrize("train_type", ["freeze", "qlora"])
def test_freeze_and_qlora_policies(train_type, sft_model, arith, tmp_path):
    """freeze trains full weights of the last block against a frozen copy; qlora an adapter on the
    4-bit base against the adapter-disabled base."""
    recipe = {"stage": "dpo", "train_type": train_type, "learning_rate": 1e-3, "batch_size": 4, "max_steps": 2,
              "logging_steps": 1, "seed": 0, "freeze": {"trainable_layers": 1}, "system": "Answer with a number."}
    try:
        summary = align(str(sft_model), [str(arith)], recipe, str(tmp_path / "out"), str(tmp_path / "ckpt"), MemoryRun())
    except (ImportError, RuntimeError) as err:  # bitsandbytes without a usable backend
        if train_type == "qlora":
            pytest.skip(f"qlora needs bitsandbytes: {err}")
        raise
    assert summary["reference"] == {"freeze": "frozen copy of the starting model",
                                    "qlora": "base with the adapter disabled"}[train_type]
    assert summary["trainable_params"] < summary["total_params"]


# A ChatML template that renders tools, tool calls and tool results (as Qwen2.5's does, shorter).
TOOL_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\\nTools:' }}{% for t in tools %}{{ ' ' + (t | tojson) }}{% endfor %}"
    "{{ '<|im_end|>\\n' }}{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'assistant' and m.tool_calls %}{{ '<|im_start|>assistant\\n' }}"
    "{% for c in m.tool_calls %}{{ '<tool_call>' + (c.function | tojson) + '</tool_call>' }}{% endfor %}"
    "{{ '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_tool_call_conversations_reach_the_template(tiny_model, tmp_path):
    """Tool schemas, tool calls and tool results pass unchanged from the data step to the chat
    template: in SFT the tool call and the final answer are labels, the tool result and the
    schemas are context; DPO (trl) renders the row's tools into the prompt and trains on it."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer

    from test_data import TOOL_CHAT, TOOLS
    from snaketune.align import _common_args, load_policy, make_trainer
    from snaketune.data import prepare
    from snaketune.train import tokenize_sft

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model, model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = TOOL_TEMPLATE
    tok.save_pretrained(model_dir)

    src = tmp_path / "pref.jsonl"
    src.write_text("".join(json.dumps({"prompt": TOOL_CHAT[:3], "chosen": [TOOL_CHAT[3]],
                                       "rejected": [{"role": "assistant", "content": str(k)}], "tools": TOOLS}) + "\n"
                           for k in (4, 6, 7, 8)))
    data = tmp_path / "data"
    prepare({"source": "local", "path": str(src), "format": "preference", "test_size": 0}, data)
    row = read(data / "preference.jsonl")[0]
    assert row["prompt"] == TOOL_CHAT[:3] and row["tools"] == TOOLS

    enc = tokenize_sft(TOOL_CHAT, tok, 512, tools=TOOLS)
    full = tok.decode(enc["input_ids"])
    labelled = tok.decode([t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != -100])
    assert '"name": "add"' in full.split("<|im_start|>user")[0]  # the schema, in the system turn
    # each assistant turn with its end-of-turn marker and the newline after it (label_separator)
    assert labelled == '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call><|im_end|>\n5<|im_end|>\n'

    recipe = resolve("recipes", {"stage": "dpo", "train_type": "lora", "learning_rate": 5e-6, "batch_size": 2,
                                 "max_steps": 2, "logging_steps": 1, "seed": 0})
    model, peft_config = load_policy(str(model_dir), recipe, torch.float32)
    trainer = make_trainer("dpo", model, tok, Dataset.from_list(read(data / "preference.jsonl")), recipe,
                           _common_args(recipe, tmp_path / "ckpt", False, "fp32", 2), [], peft_config)
    prompt = tok.decode(trainer.train_dataset[0]["prompt_ids"])
    assert '"name": "add"' in prompt and "<tool_call>" in prompt and "<|im_start|>tool\n5" in prompt
    summary = align(str(model_dir), [str(data)], recipe, str(tmp_path / "out"), str(tmp_path / "ckpt2"), MemoryRun())
    assert summary["steps"] == 2


@pytest.mark.learning
def test_grpo_tools_run_in_trls_tool_calling_loop(tiny_model, tmp_path):
    """grpo.tools: a model SFT-trained (on conversations with tool calls, Qwen2.5's chat template)
    to call ``add`` calls it during GRPO; trl parses the calls, runs the function from the recipe's
    file and logs how often. The tool records its calls, so the test sees them executed."""
    import random

    import trl
    from transformers import AutoTokenizer
    from transformers.utils import get_json_schema

    from snaketune.rewards import load_function
    from snaketune.train import train

    calls = tmp_path / "calls.jsonl"
    tool_file = tmp_path / "tools.py"
    tool_file.write_text(
        "import json\n\n\ndef add(a: int, b: int) -> int:\n"
        '    """Add two integers.\n\n    Args:\n        a: The first integer.\n        b: The second integer.\n    """\n'
        f"    with open({str(calls)!r}, 'a') as fh:\n        fh.write(json.dumps([a, b]) + '\\n')\n"
        "    return a + b\n")
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model, model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text()
    tok.save_pretrained(model_dir)

    schema = get_json_schema(load_function(f"{tool_file}:add", "tool"))
    rng = random.Random(0)
    sft_data, grpo_data = tmp_path / "sft-data", tmp_path / "grpo-data"
    sft_data.mkdir()
    grpo_data.mkdir()
    rows = []
    for _ in range(200):
        a, b = rng.randrange(20), rng.randrange(20)
        rows.append({"tools": [schema], "messages": [
            {"role": "user", "content": f"What is {a}+{b}?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "add", "arguments": {"a": a, "b": b}}}]},
            {"role": "tool", "name": "add", "content": str(a + b)},
            {"role": "assistant", "content": str(a + b)}]})
    (sft_data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (grpo_data / "train.jsonl").write_text("".join(
        json.dumps({"messages": r["messages"][:1] + r["messages"][-1:]}) + "\n" for r in rows[:16]))
    sft = tmp_path / "sft"
    train(str(model_dir), [str(sft_data)], {"stage": "sft", "train_type": "full", "learning_rate": 5e-3,
                                            "lr_scheduler": "constant", "batch_size": 8, "max_steps": 250,
                                            "max_length": 700, "logging_steps": 250, "save_steps": 10000,
                                            "seed": LEARNING_SEED},
          str(sft), str(tmp_path / "sft.ckpt"), MemoryRun())

    run = MemoryRun()
    recipe = {"stage": "grpo", "train_type": "full", "learning_rate": 1e-4, "batch_size": 2, "max_steps": 3,
              "logging_steps": 1, "seed": 0,
              "grpo": {"num_generations": 4, "max_completion_length": 96, "max_tool_calling_iterations": 1,
                       "tools": [f"{tool_file}:add"]}}
    summary = align(str(sft), [str(grpo_data)], recipe, str(tmp_path / "out"), str(tmp_path / "ckpt"), run)
    made = [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []
    print(f"grpo tools: call frequency {run.metrics['tools/call_frequency']}, {len(made)} calls executed")
    assert summary["steps"] == 3 and len(run.metrics["tools/call_frequency"]) == 3
    record_learning("grpo tool-call frequency", mean(run.metrics["tools/call_frequency"]), 0.2)
    assert mean(run.metrics["tools/call_frequency"]) > 0.2
    assert made and all(isinstance(a, int) and isinstance(b, int) for a, b in made)
    with pytest.raises(SnaketuneError, match="RLOOTrainer has no tool calling"):
        align(str(sft), [str(grpo_data)], {**recipe, "grpo": {**recipe["grpo"], "variant": "rloo"}},
              str(tmp_path / "o2"))


def test_a_run_shorter_than_logging_steps_from_the_cli(tiny_model, arith, tmp_path):
    """4 steps logged every 5: no step loss is logged, and the CLI's summary line used to fail on it
    (TypeError formatting None) after the adapter was saved; the run's mean loss stands in."""
    from snaketune.align import main

    recipe = {"stage": "dpo", "train_type": "lora", "learning_rate": 1e-4, "batch_size": 4, "max_steps": 4,
              "logging_steps": 5, "seed": 0}
    main(["--base", str(tiny_model), "--data", str(arith), "--params", json.dumps(recipe), "--out",
          str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")])
    written = json.loads((tmp_path / "out/training.json").read_text())
    assert written["first_loss"] == written["final_loss"] == written["train_loss"] > 0
