"""Build the Colab notebooks (`colab/*.ipynb`) from their readable sources (`colab/src/*.py`).

    python colab/_build.py           # rewrite every notebook
    python colab/_build.py --check   # exit 1 if a committed notebook differs from its source

A source is a Python file in the "percent" format (as jupytext and VS Code
read it): `# %%` starts a code cell, `# %% [markdown]` a markdown cell whose
lines are comments, `# %% tags=["parameters"]` a tagged code cell, and
`# %% include: NAME` inserts the shared cells `NAME` from `SHARED` below (the
installation, parameters and device-discovery cells every notebook starts
with). The notebooks are written without outputs and with fixed cell ids, so a
rebuild from unchanged sources is byte-identical and diffs stay small.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

COLAB_DIR = Path(__file__).resolve().parent
SOURCE_DIR = COLAB_DIR / "src"
NOTEBOOKS = ("sft_quickstart", "tulu3_loss_ablation", "dpo", "grpo", "lora_sft")

_INSTALL = '''\
# Installation. On Colab: the package from a wheel you uploaded or from SOURCE, plus jax[tpu] on a TPU runtime.
# Skipped when posttrain_jax is importable already (a local checkout, the tests, a second run).
# Make the wheel in a checkout with `python -m pip wheel --no-deps . -w dist` and drop dist/posttrain_jax-*.whl
# into Colab's file pane, or set SOURCE to a pip requirement, e.g. "git+https://<git host>/<you>/posttrain_jax.git".
import glob
import importlib
import importlib.util
import os
import subprocess
import sys

SOURCE = os.environ.get("POSTTRAIN_JAX_SOURCE", "")

# Colab TPU runtimes ship libtpu and expose the chips as /dev/accel* (v2-v4) or /dev/vfio/* (v5e, v6e).
ON_TPU = os.environ.get("JAX_PLATFORMS", "") != "cpu" and bool(
    importlib.util.find_spec("libtpu") or os.environ.get("COLAB_TPU_ADDR") or os.environ.get("TPU_ACCELERATOR_TYPE")
    or glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))
if importlib.util.find_spec("posttrain_jax") is None:
    wheels = sorted(glob.glob("posttrain_jax-*.whl") + glob.glob("/content/posttrain_jax-*.whl"))
    source = SOURCE or (wheels[-1] if wheels else "")
    if not source:
        raise RuntimeError("posttrain_jax is not installed: upload dist/posttrain_jax-*.whl (see the comment "
                           "above) or set SOURCE to a pip requirement for it, then run this cell again")
    packages = [source, "matplotlib"] + (["jax[tpu]"] if ON_TPU else [])
    print("pip install", *packages)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *packages], check=True)
    importlib.invalidate_caches()
else:
    print("posttrain_jax is importable already: nothing to install")
print("TPU runtime" if ON_TPU else "CPU runtime (or GPU)")'''

_PARAMETERS = '''\
# Parameters (papermill: this cell is tagged "parameters"; or set the environment variables).
# FAST shrinks data and steps so the notebook runs top to bottom on a CPU in about a minute (the tests run it so);
# without it every size is the real quickstart's.
FAST = os.environ.get("POSTTRAIN_JAX_NOTEBOOK_FAST", "0") == "1"
RUNS_DIR = os.environ.get("POSTTRAIN_JAX_RUNS_DIR", "runs")  # every run of this notebook writes under here
print(f"FAST={FAST}, runs under {os.path.abspath(RUNS_DIR)}")'''

_DEVICES = '''\
import jax

print(f"jax {jax.__version__}, backend {jax.default_backend()!r}, {jax.device_count()} device(s):")
for device in jax.devices():
    print("   ", device)
# One mesh for every run here: FSDP over all devices (-1 fills them). A v5e-1 / v6e-1 or a CPU runtime
# has one device, so this is single-device training; the same config shards over a v5e-8 or a pod.
MESH = {"data": 1, "fsdp": -1, "tensor": 1}'''

SHARED = {
    "setup": [("markdown", "## Setup\n\nInstall the package (on Colab), then read the notebook's parameters."),
              ("code", _INSTALL), ("code", _PARAMETERS, ["parameters"])],
    "devices": [("markdown", "## Devices\n\nWhat JAX sees: the TPU chip(s) on a TPU runtime, else the CPU."),
                ("code", _DEVICES)],
}

_MARKER = re.compile(r"^# %%(?P<rest>.*)$")


def parse_source(text: str, where: str) -> list[tuple]:
    """Cells (kind, source[, tags]) of a percent-format source; `where` names the file in errors."""
    cells, kind, tags, lines = [], None, [], []

    def flush():
        if kind is None:
            if "".join(lines).strip():
                raise ValueError(f"{where}: text before the first '# %%' marker")
            return
        body = "\n".join(lines).strip("\n")
        if kind == "markdown":
            body = "\n".join(_uncomment(line, where) for line in body.split("\n"))
        if not body.strip():
            raise ValueError(f"{where}: an empty {kind} cell")
        cells.append((kind, body, tags) if tags else (kind, body))

    for number, line in enumerate(text.split("\n"), 1):
        match = _MARKER.match(line)
        if not match:
            lines.append(line)
            continue
        flush()
        kind, tags, lines = None, [], []
        rest = match.group("rest").strip()
        if rest.startswith("include:"):
            name = rest.removeprefix("include:").strip()
            if name not in SHARED:
                raise ValueError(f"{where}:{number}: unknown include {name!r}; known: {', '.join(SHARED)}")
            cells.extend(SHARED[name])
        elif rest == "[markdown]":
            kind = "markdown"
        elif rest.startswith("tags="):
            kind, tags = "code", json.loads(rest.removeprefix("tags="))
        elif rest == "":
            kind = "code"
        else:
            raise ValueError(f"{where}:{number}: cannot read cell marker {line!r} (use '# %%', '# %% [markdown]', "
                             f"'# %% tags=[...]' or '# %% include: NAME')")
    flush()
    return cells


def _uncomment(line: str, where: str) -> str:
    if line == "#":
        return ""
    if not line.startswith("# "):
        raise ValueError(f"{where}: markdown line {line!r} must start with '# '")
    return line[2:]


def build_notebook(name: str) -> dict:
    """The nbformat v4 notebook (a plain dict) of `colab/src/<name>.py`, without outputs."""
    path = SOURCE_DIR / f"{name}.py"
    cells = []
    for index, (kind, source, *rest) in enumerate(parse_source(path.read_text(), str(path))):
        cell = {"cell_type": kind, "id": f"{name}-{index:02d}", "metadata": {"tags": rest[0]} if rest else {},
                "source": source.splitlines(keepends=True)}
        if kind == "code":
            cell.update(execution_count=None, outputs=[])
        cells.append(cell)
    metadata = {"colab": {"name": f"{name}.ipynb", "provenance": []},
                "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                "language_info": {"name": "python"}}
    return {"cells": cells, "metadata": metadata, "nbformat": 4, "nbformat_minor": 5}


def notebook_text(name: str) -> str:
    """The exact text `colab/<name>.ipynb` should have."""
    return json.dumps(build_notebook(name), indent=1, ensure_ascii=False) + "\n"


def stale_notebooks() -> list[str]:
    """Names whose committed .ipynb differs from what its source builds."""
    return [name for name in NOTEBOOKS
            if not (COLAB_DIR / f"{name}.ipynb").exists()
            or (COLAB_DIR / f"{name}.ipynb").read_text() != notebook_text(name)]


def main(argv: list[str]) -> int:
    if argv == ["--check"]:
        stale = stale_notebooks()
        for name in stale:
            print(f"colab/{name}.ipynb is out of date with colab/src/{name}.py: run python colab/_build.py")
        return 1 if stale else 0
    if argv:
        print(__doc__.strip())
        return 2
    for name in NOTEBOOKS:
        (COLAB_DIR / f"{name}.ipynb").write_text(notebook_text(name))
        print(f"wrote colab/{name}.ipynb")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
