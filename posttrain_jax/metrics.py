"""Metrics out of the loop: JSONL + TensorBoard on process 0, a progress bar, MFU.

Only process 0 writes; every process may call `log` (the others do nothing), so
the loop needs no `if process_index == 0` of its own. The output directory may
be a bucket (`gs://...`, through `etils.epath`): object stores cannot append,
so there the JSONL file is rewritten whole every `flush_every_s` and at close.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from typing import Any

import jax
import numpy as np
from etils import epath

log = logging.getLogger(__name__)


def _scalar(value: Any) -> float | int:
    value = np.asarray(value)
    return value.item() if value.size == 1 else float(value.mean())


def is_remote(path) -> bool:
    """True for object-store paths (gs://, s3://, ...) that `open`/`os.path` cannot write."""
    return "://" in str(path) and not str(path).startswith("file://")


def _tensorboard_dir(directory: str) -> str:
    if not is_remote(directory):
        return os.path.join(directory, "tensorboard")
    try:  # tensorboardX writes gs:// itself with google-cloud-storage (no TensorFlow needed)
        import google.cloud.storage  # noqa: F401
        if directory.startswith("gs://"):
            return directory.rstrip("/") + "/tensorboard"
    except ImportError:
        pass
    local = os.path.join(tempfile.gettempdir(), "posttrain_jax_tensorboard", re.sub(r"[^\w.-]+", "_", directory))
    log.warning("TensorBoard events for %s go to the local directory %s (writing to a bucket needs "
                "`pip install google-cloud-storage`); copy them with `gcloud storage rsync`", directory, local)
    return local


class MetricsWriter:
    """Append-only JSONL (`metrics.jsonl`) and TensorBoard events under `directory` (a path or gs:// URL)."""

    def __init__(self, directory, *, tensorboard: bool = True, flush_every_s: float = 60.0):
        self.active = jax.process_index() == 0
        directory = os.fspath(directory) if not isinstance(directory, str) else directory
        self.path = str(epath.Path(directory) / "metrics.jsonl")
        self.tensorboard_dir = _tensorboard_dir(directory) if tensorboard and self.active else None
        self._remote, self._flush_every_s, self._flushed = is_remote(directory), flush_every_s, time.time()
        self._jsonl = self._tb = self._text = None
        if self.active:
            epath.Path(directory).mkdir(parents=True, exist_ok=True)
            if self._remote:
                path = epath.Path(self.path)
                self._text = [path.read_text()] if path.exists() else []  # a resumed run appends
            else:
                self._jsonl = open(self.path, "a", buffering=1)
            if tensorboard:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(self.tensorboard_dir)

    def log(self, step: int, metrics: dict[str, Any], prefix: str = "train") -> dict[str, float]:
        """Write one row; returns the host scalars (a device sync: call every N steps only)."""
        row = {f"{prefix}/{k}": _scalar(v) for k, v in jax.device_get(metrics).items()}
        if self.active:
            line = json.dumps({"step": int(step), "time": time.time(), **row}) + "\n"
            if self._remote:
                self._text.append(line)
                if time.time() - self._flushed >= self._flush_every_s:
                    self.flush()
            else:
                self._jsonl.write(line)
            if self._tb is not None:
                for key, value in row.items():
                    self._tb.add_scalar(key, value, int(step))
        return row

    def flush(self):
        """Make everything logged so far visible (a bucket: rewrite the file)."""
        if self._text is not None:
            epath.Path(self.path).write_text("".join(self._text))
            self._flushed = time.time()
        if self._jsonl:
            self._jsonl.flush()
        if self._tb:
            self._tb.flush()

    def close(self):
        if self.active:
            self.flush()
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()


class Throughput:
    """Tokens/s, step time and MFU over the steps since the last report."""

    def __init__(self, flops_per_token: float, peak_flops: float | None):
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.reset()

    def reset(self):
        self._start, self._tokens, self._steps = time.perf_counter(), 0, 0

    def add(self, tokens: int, steps: int = 1):
        self._tokens += tokens
        self._steps += steps

    def report(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        tps = self._tokens / elapsed
        out = {"tokens_per_s": tps, "step_time_s": elapsed / max(self._steps, 1)}
        if self.peak_flops:
            out["mfu"] = tps * self.flops_per_token / (self.peak_flops * jax.device_count())
        self.reset()
        return out


def progress_bar(total: int | None, initial: int = 0, desc: str = "train", unit: str = "step", leave: bool = True):
    """A tqdm bar (count, rate, ETA when `total` is known) on process 0 (disabled elsewhere)."""
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=leave,
                disable=jax.process_index() != 0)


def measure_matmul_peak(n: int = 2048, dtype=np.float32, repeats: int = 5) -> float:
    """FLOP/s of a jitted n^3 matmul on the default device: a practical peak for MFU on CPU."""
    import jax.numpy as jnp
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best
