"""The config schema (workflow/schemas/config.schema.yaml): the one source of config keys and their
defaults. The workflow fills the defaults in with Snakemake's validate; a step called with a block
of its own (tests, benchmarks) gets the same ones from ``resolve``."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


@functools.cache
def schema() -> dict:
    import yaml

    return yaml.safe_load(SCHEMA.read_text())


def block_schema(section: str) -> dict:
    """The schema of one config block, by dotted path: ``recipes`` (a recipe), ``recipes.lora``,
    ``serving``, ``benches`` (a bench), ... (name maps step into their entries)."""
    node = schema()
    for key in section.split("."):
        node = node["properties"][key]
        if node.get("$ref") == "#/definitions/name_map":
            node = node["additionalProperties"]
    return node


@functools.cache
def _filler():
    """A validator class that fills in each ``properties`` default it meets (also under if/then/else
    and array items), as Snakemake's validate(set_default=True) does."""
    import jsonschema

    base = jsonschema.validators.validator_for(schema())
    check_properties = base.VALIDATORS["properties"]

    def properties(validator, props, instance, sub):
        if validator.is_type(instance, "object"):
            for key, prop in props.items():
                if "default" in prop and key not in instance:
                    instance[key] = copy.deepcopy(prop["default"])
        yield from check_properties(validator, props, instance, sub)

    return jsonschema.validators.extend(base, {"properties": properties})


def resolve(section: str, block: dict) -> dict:
    """A copy of ``block`` (a config block of ``section``, see ``block_schema``) with the schema's
    defaults filled in where it has no value; its values are not checked here (the workflow checks
    the whole config before any step runs)."""
    out = copy.deepcopy(block)
    validator = _filler()(schema()).evolve(schema=block_schema(section))
    for _ in validator.iter_errors(out):
        pass
    return out
