"""The accelerator extras pin the jax this project is tested with (a mismatched jaxlib plugin fails at start)."""

import importlib.metadata
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_gpu_and_tpu_compile_extras_pin_the_installed_jax():
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    version = importlib.metadata.version("jax")
    assert extras["gpu"] == [f"jax[cuda12]=={version}"]
    assert extras["tpu-compile"] == [f"jax[tpu]=={version}"]
