"""Config validation: defaults are filled in, and a wrong key or type names the key."""

import subprocess
import sys

import pytest
import yaml
from snakemake.utils import validate

from conftest import ROOT

SCHEMA = str(ROOT / "workflow/schemas/config.schema.yaml")


def default_config():
    return yaml.safe_load((ROOT / "config.yaml").read_text())


def test_default_config_is_valid_and_gets_defaults():
    config = default_config()
    validate(config, SCHEMA, set_default=True)
    sft = config["recipes"]["sft-lora"]
    assert sft["lora"]["dropout"] == 0.0 and sft["truncation"] == "truncate"
    assert config["tracking"]["uri"] == "" and config["seed"] == 0
    assert config["benches"]["arith"]["batch_size"] == 32



TRAIN_TYPES = ["full", "freeze", "lora", "qlora", "dora", "rslora", "pissa", "olora"]


@pytest.mark.parametrize("stage", ["pt", "sft", "dpo", "kto", "orpo", "simpo", "cpo", "rm", "grpo"])
def test_learning_rate_default_follows_the_train_type(stage):
    """One default, the schema's (ms-swift's): 1e-5 for full and freeze, 1e-4 for the LoRA family, in
    every stage; a recipe's own rate wins (the schema used to fill 1e-4 everywhere)."""
    config = default_config()
    config["recipes"] = {t: {"stage": stage, "train_type": t, "dataset": "arith"} for t in TRAIN_TYPES}
    config["recipes"]["own"] = {"stage": stage, "train_type": "full", "dataset": "arith", "learning_rate": 3e-3}
    validate(config, SCHEMA, set_default=True)
    rates = {name: r["learning_rate"] for name, r in config["recipes"].items()}
    assert rates == {"full": 1e-5, "freeze": 1e-5, **{t: 1e-4 for t in TRAIN_TYPES[2:]}, "own": 3e-3}


def test_align_trains_at_the_schema_default(tmp_path):
    """A DPO recipe without a learning rate trains at the schema's default, not at a step's own."""
    from snaketune.align import _common_args

    config = default_config()
    config["recipes"]["dpo"] = {"stage": "dpo", "train_type": "full", "dataset": "arith", "from": "sft-lora"}
    validate(config, SCHEMA, set_default=True)
    assert _common_args(config["recipes"]["dpo"], tmp_path, False, "fp32", 10)["learning_rate"] == 1e-5

@pytest.mark.parametrize("mutate, needle", [
    (lambda c: c["recipes"]["sft-lora"].update(learnig_rate=1e-4), "learnig_rate"),
    (lambda c: c["recipes"]["sft-lora"].update(learning_rate="fast"), "fast"),
    (lambda c: c["recipes"]["sft-lora"].update(train_type="lorax"), "lorax"),
    (lambda c: c.update(modles={}), "modles"),
    (lambda c: c["models"]["tiny-qwen2"].update(source="hf"), "repo"),
    (lambda c: c["recipes"].update(base=c["recipes"]["pt"]), "base"),
])
def test_bad_config_is_rejected_naming_the_key(mutate, needle):
    config = default_config()
    mutate(config)
    with pytest.raises(Exception) as err:
        validate(config, SCHEMA, set_default=True)
    assert needle in str(err.value)


def _dry_run(tmp_path, config):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run([sys.executable, "-m", "snakemake", "-n", "--snakefile", str(ROOT / "workflow/Snakefile"),
                           "--configfile", str(path), "--directory", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)


def test_dangling_references_stop_the_run_before_any_job(tmp_path):
    config = default_config()
    config["recipes"]["sft-lora"]["from"] = "pretrain"
    config["evaluation"]["variants"].append("sft-lora/int3")
    result = _dry_run(tmp_path, config)
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "recipes.sft-lora.from: 'pretrain'" in out
    assert "'int3' is not a key of quantize" in out


def test_unknown_key_stops_snakemake_with_the_key_named(tmp_path):
    config = default_config()
    config["recipes"]["pt"]["epoch"] = 3
    result = _dry_run(tmp_path, config)
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "recipes.pt: Additional properties are not allowed ('epoch' was unexpected)" in out


def test_a_stages_own_keys_sit_in_its_block(tmp_path):
    """A DPO key at the recipe's top level (where it was before per-method blocks) stops the run with
    the block to move it into; a block of another stage (a kto: block in a dpo recipe, which would do
    nothing) stops it naming the block (issue 14)."""
    config = default_config()
    config["recipes"]["dpo"] = {"stage": "dpo", "from": "sft-lora", "train_type": "lora", "dataset": "arith",
                                "beta": 0.3}
    out = _dry_run(tmp_path, config)
    assert out.returncode != 0
    assert "recipes.dpo: Additional properties are not allowed ('beta' was unexpected)" in out.stdout + out.stderr
    assert "`dpo: {beta: 0.3}`" in out.stdout + out.stderr

    config["recipes"]["dpo"].pop("beta")
    config["recipes"]["dpo"]["kto"] = {"beta": 0.3}
    out = _dry_run(tmp_path, config)
    assert out.returncode != 0
    assert "recipes.dpo.kto: a kto: block in a stage 'dpo' recipe would do nothing" in out.stdout + out.stderr

    config["recipes"]["dpo"]["dpo"] = config["recipes"]["dpo"].pop("kto")
    assert _dry_run(tmp_path, config).returncode == 0


def test_method_args_are_the_blocks_with_the_schemas_defaults():
    """What each align stage passes to its trl config: its block, the schema's defaults filled in
    (SimPO's beta 2.0 and no NLL term), max_length, and no key of any other stage."""
    from snaketune.align import method_args
    from snaketune.registry import STAGES
    from snaketune.schema import block_schema

    recipe = {"max_length": 64}
    assert method_args(recipe, "dpo") == {"beta": 0.1, "max_length": 64}
    assert method_args({**recipe, "dpo": {"loss_type": "ipo"}}, "dpo") == {"beta": 0.1, "loss_type": ["ipo"],
                                                                         "max_length": 64}
    assert method_args(recipe, "simpo") == {"beta": 2.0, "simpo_gamma": 0.5, "cpo_alpha": 0.0,
                                            "loss_type": "simpo", "max_length": 64}
    assert method_args({**recipe, "orpo": {"nll": "full"}}, "orpo") == {"beta": 0.1, "max_length": 64}
    assert method_args({**recipe, "kto": {"beta": 0.5}, "dpo": {"beta": 9.0}}, "kto")["beta"] == 0.5
    # every align stage has its block in the schema, and no other stage has one
    blocks = {stage for stage in STAGES if stage in block_schema("recipes")["properties"]}
    assert blocks == {name for name, stage in STAGES.items() if stage.step == "align"}
