"""The conda env file and the pip requirements pin the same versions."""

import re

import yaml

from conftest import ROOT


def pins(lines):
    out = {}
    for line in lines:
        m = re.match(r"^\s*([A-Za-z0-9_.-]+)==([^\s;#]+)", line)
        if m:
            out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


def test_conda_env_matches_requirements():
    env = yaml.safe_load((ROOT / "envs/snaketune.yaml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    reqs = pins((ROOT / "requirements.txt").read_text().splitlines())
    assert pins(pip_section) == reqs


def test_constraints_agree_with_requirements():
    reqs = pins((ROOT / "requirements.txt").read_text().splitlines())
    lock = pins((ROOT / "constraints.txt").read_text().splitlines())
    for name, version in reqs.items():
        assert lock.get(name, version) == version, f"{name}: requirements {version}, constraints {lock[name]}"
