"""Per-op time shares of one compiled XLA step, from a `jax.profiler` trace.

Shares, not absolute times: on a machine that other jobs load, every op slows alike, so where the
time goes stays readable when tokens/s are not. Each executed HLO op (a thunk on XLA:CPU) is one
trace event named after the instruction; its shape and `op_name` metadata come from the compiled
HLO text, which says which line of the model it is (attention einsum, MLP, LM head, optimizer).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import tempfile

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+) ([\w\-]+)\(", re.M)
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def hlo_instructions(hlo_text: str) -> dict[str, tuple[str, str, str]]:
    """instruction name -> (shape, opcode, op_name) for every line of the compiled HLO."""
    out = {}
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if m:
            name = _OP_NAME.search(line)
            out[m.group(1)] = (m.group(2), m.group(3), name.group(1) if name else "")
    return out


def kind_of(name: str, opcode: str) -> str:
    if name.startswith(("ynn_fusion", "xnn_fusion", "onednn")) or opcode in ("dot", "convolution"):
        return "matmul"
    if "copy" in name or "transpose" in name or opcode in ("copy", "transpose"):
        return "copy/transpose"
    return "elementwise/reduce/other"


def region_of(op_name: str) -> str:
    """A coarse model region from the op's source path (jax op names carry the einsum spec)."""
    if "/while/" in op_name:
        return "lm head + loss (fused scan)"
    if any(k in op_name for k in ("bkgts", "btkgd", "softmax", "_where")):
        return "attention scores/softmax"
    if any(k in op_name for k in ("btd,dhk", "bthk,hkd")):
        return "attention projections"
    if "concatenate" in op_name or "/cos" in op_name or "/sin" in op_name:
        return "rope"
    if "rsqrt" in op_name or "/mean" in op_name:
        return "rmsnorm"
    return op_name.split("/")[-1][:40] or "?"


def op_shares(run_step, hlo_text: str, top: int = 30) -> dict:
    """Trace one call of `run_step` and return time shares by kind, by region and the top ops."""
    import jax

    instructions = hlo_instructions(hlo_text)
    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory, create_perfetto_trace=True):
            run_step()
        (path,) = glob.glob(f"{directory}/**/*.trace.json.gz", recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    by_kind, by_region, by_op = collections.Counter(), collections.Counter(), collections.Counter()
    for event in events:
        if event.get("ph") != "X" or event.get("name") not in instructions:
            continue
        shape, opcode, op_name = instructions[event["name"]]
        ms = event.get("dur", 0) / 1e3
        kind = kind_of(event["name"], opcode)
        by_kind[kind] += ms
        by_region[f"{kind}: {region_of(op_name)}"] += ms
        by_op[(event["name"], shape, op_name[-80:])] += ms
    total = sum(by_kind.values()) or 1.0
    share = lambda ms: round(ms / total, 4)  # noqa: E731
    return {"op_time_ms": round(total, 1), "by_kind": {k: share(v) for k, v in by_kind.most_common()},
            "by_region": {k: share(v) for k, v in by_region.most_common(top)},
            "top_ops": [{"op": n, "shape": s, "op_name": o, "share": share(v)}
                        for (n, s, o), v in by_op.most_common(top)]}
