"""Resumable work split over processes: each process's share of a batch, its own output shard, a progress
record replaced atomically after every batch, and exact sums over processes (rejection sampling, eval)."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from jax.experimental import multihost_utils


def global_sum(values: np.ndarray) -> np.ndarray:
    """Sum float64 vectors over processes, exactly: sent as bytes, since without jax_enable_x64 an
    allgather would round them to float32 (token counts pass 2**24 in a real run)."""
    values = np.ascontiguousarray(values, np.float64)
    if jax.process_count() == 1:
        return values
    raw = np.asarray(multihost_utils.process_allgather(values.view(np.uint8)))
    return np.ascontiguousarray(raw.reshape(jax.process_count(), -1)).view(np.float64).sum(axis=0)


def shard_path(output: str, process_index: int, process_count: int) -> str:
    """This process's output file: `output` itself with one process, else `out-00001-of-00004.jsonl`."""
    if process_count == 1:
        return output
    return f"{output.removesuffix('.jsonl')}-{process_index:05d}-of-{process_count:05d}.jsonl"


def batch_share(prompts: list, batch: int, prompts_per_batch: int, process_index: int,
                process_count: int) -> tuple[list, int]:  # fmt: skip
    """This process's contiguous share of global batch `batch` (file order) and how many of it are real.

    The last batch is padded with copies of the first prompt, so every batch has one shape; padding sits at
    the end of the batch, so the real prompts of a share are always its first ones.
    """
    begin = batch * prompts_per_batch
    chunk = prompts[begin:begin + prompts_per_batch]
    real = len(chunk)
    chunk = chunk + [prompts[0]] * (prompts_per_batch - real)
    share = prompts_per_batch // process_count
    first = process_index * share
    return chunk[first:first + share], int(np.clip(real - first, 0, share))


def read_progress(path: str, fingerprint: dict) -> list[dict]:
    """The recorded batches of a previous run with the same settings ([] if there is none)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        saved = json.load(f)
    changed = sorted(k for k in set(fingerprint) | set(saved["fingerprint"])
                     if fingerprint.get(k) != saved["fingerprint"].get(k))
    if changed:
        details = "; ".join(f"{k}: {saved['fingerprint'].get(k)!r} -> {fingerprint.get(k)!r}" for k in changed)
        raise ValueError(f"cannot resume from {path}: settings changed ({details}); run without --resume to "
                         f"start over")
    return saved["entries"]


def write_progress(path: str, fingerprint: dict, entries: list[dict]) -> None:
    with open(path + ".tmp", "w") as f:  # replaced atomically: a crash leaves the old record or the new one
        json.dump({"fingerprint": fingerprint, "entries": entries}, f)
    os.replace(path + ".tmp", path)
