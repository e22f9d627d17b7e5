"""The registries (snaketune.registry) name what the schema accepts, and load without torch."""

import subprocess
import sys

import yaml

from conftest import ROOT

SCHEMA = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())


def test_schema_enums_are_the_registries_keys():
    from snaketune.registry import FULL_TYPES, LORA_TYPES, METHODS, STAGES

    recipe = SCHEMA["properties"]["recipes"]["additionalProperties"]["properties"]
    quantize = SCHEMA["properties"]["quantize"]["additionalProperties"]["properties"]
    assert recipe["stage"]["enum"] == list(STAGES)
    assert recipe["train_type"]["enum"] == [*FULL_TYPES, *LORA_TYPES]
    assert quantize["method"]["enum"] == list(METHODS)
    assert SCHEMA["properties"]["recipes"]["additionalProperties"]["if"]["properties"]["train_type"]["enum"] == \
        list(FULL_TYPES)


def test_bench_metrics_are_the_evaluate_steps():
    """A bench's metric is one the evaluate step scores (METRICS, also scored on EvalScope's
    predictions) or EvalScope's own."""
    from snaketune.evalscope_eval import OUR_METRICS
    from snaketune.evaluate import METRICS

    bench = SCHEMA["properties"]["benches"]["additionalProperties"]["properties"]
    assert bench["metric"]["enum"] == [*METRICS, "evalscope"] and OUR_METRICS == tuple(METRICS)


def test_registry_imports_without_torch():
    """config.smk imports it while Snakemake parses the workflow."""
    code = "import sys; sys.modules['torch'] = None; import snaketune.registry"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_every_stage_has_a_step_and_a_data_file_of_its_row_kind():
    from snaketune.data import SPLITS
    from snaketune.registry import STAGES

    for name, stage in STAGES.items():
        assert stage.step in ("train", "align"), name
        assert stage.data == f"{SPLITS[stage.rows][0]}.jsonl", name
        assert (stage.trainer is None) == (stage.step == "train"), name
