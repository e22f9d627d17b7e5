"""The learning tests once more under another CPU capability, so that an outcome that depends on
this machine's kernels fails here before it fails on someone else's machine.

Another CPU (AVX-512 instead of AVX2, or plain x86-64) rounds differently, and tiny-model training
turns rounding into a different model. ``pytest -m learning`` runs in a subprocess with
``ATEN_CPU_CAPABILITY`` forced to a capability that is not this machine's own (avx2 on an AVX-512
machine, default otherwise), in the background from collection on, beside the other tests.
benchmarks/robustness.py runs the full sweep (capabilities x seeds) with the margins.

``SNAKETUNE_ROBUSTNESS=0`` skips it (it adds one more run of every learning test, the demo study
among them: about 10 minutes of CPU beside the rest of the suite).
"""

import os
import subprocess
import sys

import pytest

from conftest import ROOT, Background, in_background


def other_capability() -> str:
    """A capability this CPU can run that is not its own: avx2 under AVX-512, else default."""
    import torch

    return "avx2" if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else "default"


def learning_under_other_capability() -> tuple[str, subprocess.CompletedProcess]:
    cap = other_capability()
    env = {**os.environ, "ATEN_CPU_CAPABILITY": cap}
    env.pop("PYTEST_CURRENT_TEST", None)
    result = subprocess.run(in_background([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m",
                                           "learning", "--durations=5"]),
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    return cap, result


OTHER = Background("learning-other-capability", learning_under_other_capability)


ENABLED = os.environ.get("SNAKETUNE_ROBUSTNESS", "1") != "0"


def background_start(wanted: set[str]) -> None:
    """Called by conftest.py once the tests are collected, with every fixture they use."""
    if ENABLED and "learning_elsewhere" in wanted:
        OTHER.start()


@pytest.fixture(scope="module")
def learning_elsewhere():
    return OTHER.wait()


@pytest.mark.slow
@pytest.mark.skipif(not ENABLED, reason="SNAKETUNE_ROBUSTNESS=0")
def test_learning_outcomes_hold_under_another_cpu_capability(learning_elsewhere):
    cap, result = learning_elsewhere
    out = result.stdout + result.stderr
    print(f"ATEN_CPU_CAPABILITY={cap}: {out.strip().splitlines()[-1] if out.strip() else ''}")
    assert result.returncode == 0, f"learning tests fail under ATEN_CPU_CAPABILITY={cap}:\n{out[-6000:]}"
    assert " passed" in out and " deselected" in out
