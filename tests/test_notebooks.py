"""The Colab notebooks: built from their sources, committed without outputs, and run top to bottom.

Each notebook runs in a fresh `python3` kernel (ipykernel) in fast mode
(`POSTTRAIN_JAX_NOTEBOOK_FAST=1`) with every run written under the test's
temporary directory (`POSTTRAIN_JAX_RUNS_DIR`). The kernel gets one CPU device,
like a Colab CPU runtime: the 8 fake devices of conftest are taken out of its
XLA_FLAGS, so the ablation notebook has to make its own 8 (as on Colab).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

COLAB = Path(__file__).resolve().parents[1] / "colab"
CELL_TIMEOUT_S = 300  # per cell; fast mode takes seconds per cell, but CI cores are shared
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _builder():
    spec = importlib.util.spec_from_file_location("colab_build", COLAB / "_build.py")  # colab/ is no package
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILD = _builder()


def test_notebooks_are_built_from_their_sources():
    stale = BUILD.stale_notebooks()
    assert not stale, f"colab/{{{','.join(stale)}}}.ipynb differ from colab/src/: run `python colab/_build.py`"


@pytest.mark.parametrize("name", BUILD.NOTEBOOKS)
def test_notebook_is_valid_and_has_no_outputs(name):
    nb = nbformat.read(COLAB / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code), f"{name}.ipynb has outputs"
    sources = "\n".join(c.source for c in code)
    # What every notebook promises: install cell, FAST parameter, runs dir, device discovery.
    for needle in ("POSTTRAIN_JAX_SOURCE", "POSTTRAIN_JAX_NOTEBOOK_FAST", "POSTTRAIN_JAX_RUNS_DIR", "jax.devices()"):
        assert needle in sources, f"{name}.ipynb: no {needle!r}"
    assert any("parameters" in c.metadata.get("tags", []) for c in code), f"{name}.ipynb: no parameters cell"


def test_build_rejects_unknown_markers():
    with pytest.raises(ValueError, match="x.py:3: unknown include 'nope'"):
        BUILD.parse_source("# %%\nx = 1\n# %% include: nope\n", "x.py")
    with pytest.raises(ValueError, match="must start with '# '"):
        BUILD.parse_source("# %% [markdown]\nnot a comment\n", "x.py")


def _kernel_env(runs_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags)
    env.pop("MPLBACKEND", None)  # let ipykernel use the inline backend: figures become image/png outputs
    env.update(POSTTRAIN_JAX_NOTEBOOK_FAST="1", POSTTRAIN_JAX_RUNS_DIR=str(runs_dir), JAX_PLATFORMS="cpu")
    # A persistent compilation cache shared by the notebooks' kernels: the same model init, eval and sampler
    # programs recur across runs and notebooks, and compiling dominates fast mode on a CPU.
    env.update(JAX_COMPILATION_CACHE_DIR=str(runs_dir.parent / "xla_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def _error_text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "error":
            parts.append("\n".join(out.traceback) or f"{out.ename}: {out.evalue}")
        elif out.output_type == "stream" and out.name == "stderr":
            parts.append(out.text[-3000:])
    return _ANSI.sub("", "\n".join(parts))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """One working directory (and runs directory) for all notebooks, as in one Colab runtime: the DPO and
    GRPO notebooks reuse the SFT model the SFT notebook trained (and train it themselves when run alone)."""
    return tmp_path_factory.mktemp("notebooks")


def run_notebook(name: str, workdir: Path):
    """Execute colab/<name>.ipynb in fast mode in `workdir`; fail with the failing cell's source and traceback."""
    nb = nbformat.read(COLAB / f"{name}.ipynb", as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(workdir)}})
    current = {}
    client.on_cell_execute = lambda cell, cell_index: current.update(cell=cell, index=cell_index)
    started, failure = time.perf_counter(), None
    try:
        client.execute(env=_kernel_env(workdir / "runs"))
    except (nbclient.exceptions.CellExecutionError, nbclient.exceptions.CellTimeoutError) as error:
        failure = _ANSI.sub("", str(error))[-6000:]
    if failure is not None:  # outside the except: no chained, colour-coded copy of the same traceback
        cell = current.get("cell")
        where = f"cell {current.get('index')}" if cell is not None else "before the first cell"
        source = cell.source if cell is not None else ""
        detail = _error_text(cell) if cell is not None else ""
        pytest.fail(f"colab/{name}.ipynb failed in {where}:\n--- source ---\n{source}\n--- error ---\n"
                    f"{detail or failure}", pytrace=False)
    seconds = time.perf_counter() - started
    print(f"\n{name}.ipynb ran in {seconds:.1f} s (fast mode)")
    return nb, seconds


def _images(nb) -> int:
    return sum("image/png" in out.get("data", {}) for c in nb.cells if c.cell_type == "code" for out in c.outputs)


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _grpo_missing() -> str | None:
    try:
        importlib.import_module("posttrain_jax.trainers.grpo")
    except Exception as error:  # noqa: BLE001 - any import failure means the trainer is not there yet
        return f"posttrain_jax.trainers.grpo does not import yet ({type(error).__name__}: {error})"
    return None


def test_sft_quickstart_notebook(workdir):
    nb, _ = run_notebook("sft_quickstart", workdir)
    assert _images(nb) >= 1
    rows = _metrics(workdir / "runs" / "sft-quickstart-fast" / "metrics.jsonl")
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 9))
    assert "greedy decoding:" in "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                                         for o in c.outputs)


def test_tulu3_loss_ablation_notebook(workdir):
    nb, _ = run_notebook("tulu3_loss_ablation", workdir)
    assert _images(nb) >= 1
    rows = _metrics(workdir / "runs" / "tulu3-loss-ablation-fast" / "results.jsonl")
    grads = {}
    for r in rows:
        if r["kind"] == "gradient":  # the largest difference from the first split, per aggregation
            grads[r["aggregation"]] = max(grads.get(r["aggregation"], 0.0), r["max_rel_diff"])
    # The notebook made its own 8 CPU devices: a data-parallel split really ran, and only the legacy mean moved.
    assert any(r["split"][0] > 1 for r in rows if r["kind"] == "gradient")
    assert grads["token_mean"] < 2e-5 < 1e-2 < grads["mean_per_microbatch"]
    runs = [r for r in rows if r["kind"] == "train"]
    assert len(runs) == 4 and all("eval_exact_match_long" in r for r in runs)


def test_dpo_notebook(workdir):
    nb, _ = run_notebook("dpo", workdir)
    assert _images(nb) >= 1
    rows = _metrics(workdir / "runs" / "dpo-quickstart-fast" / "metrics.jsonl")
    assert any("train/rewards_margin" in r for r in rows) and any("eval/rewards_accuracy" in r for r in rows)


def test_grpo_notebook(workdir):
    missing = _grpo_missing()
    if missing:
        pytest.skip(missing)
    nb, _ = run_notebook("grpo", workdir)
    assert _images(nb) >= 1
    rows = _metrics(workdir / "runs" / "grpo-quickstart-fast" / "metrics.jsonl")
    assert any("train/reward_mean" in r for r in rows) and any("eval/accuracy" in r for r in rows)
