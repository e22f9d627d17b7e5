"""README's statements that the code decides: its tables list what the code accepts."""

import re

import yaml

from conftest import ROOT

README = (ROOT / "README.md").read_text()


def test_data_format_table_lists_every_format():
    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    formats = schema["properties"]["datasets"]["additionalProperties"]["properties"]["format"]["enum"]
    section = README.split("## Data formats", 1)[1].split("\n## ", 1)[0]
    assert re.findall(r"^\| `(\w+)` \|", section, re.M) == formats


def test_the_default_target_draws_the_figures_as_readme_says():
    """`all` asks for the plots rule's numbers.json, so a report of it has the figures (README said
    it had none)."""
    rule_all = (ROOT / "workflow/Snakefile").read_text().split("rule all:", 1)[1].split("\n\n", 1)[0]
    assert '{RESULTS}/report/numbers.json' in rule_all
    assert "holds no figures" not in README and "`plots` is not part of `all`" not in README
