"""A method defined outside the package trains through the README's steps: its config file
registers it, main_loop runs it, and the registry-wide contract tests cover it."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

CONFIG = "tests/external_method/simsiam.py"


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO), **extra}


def test_main_loop_trains_a_method_registered_by_its_config_file(tmp_path):
    workdir = tmp_path / "w"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "detcon.main_loop",
            f"--config={CONFIG}",
            "--mock_data",
            "--max_steps=2",
            "--log_every_steps=1",  # step 1 is logged however fast it compiles
            "--batch_size=8",
            "--config.model.depth=10",
            "--config.data.image_size=64",
            "--config.simsiam.projector_hidden_size=64",
            "--config.simsiam.projector_output_size=32",
            "--config.simsiam.predictor_hidden_size=16",
            f"--workdir={workdir}",
        ],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    with open(workdir / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    assert [line["step"] for line in lines] == [1, 2]
    # Negative cosine of L2-normalised vectors lies in [-1, 1]; a NaN would fail the run itself.
    assert all(-1.0 <= line["simsiam_loss"] <= 1.0 for line in lines)
    assert lines[-1]["simsiam_loss"] == lines[-1]["objective"]


@pytest.mark.slow
def test_the_method_contract_covers_it():
    """The contract tests pick the method up from DETCON_EXTRA_METHODS, as any registered one."""
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_methods_contract.py",
            "-k",
            "simsiam",
        ],
        cwd=REPO,
        env=_env(DETCON_EXTRA_METHODS="tests.external_method.simsiam"),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert run.returncode == 0, run.stdout[-3000:]
    assert " passed" in run.stdout and " failed" not in run.stdout  # exit 5 if none selected
