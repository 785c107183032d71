"""XLA:CPU flags: several devices on one CPU host (tests, CPU meshes, the ablation) and every command's defaults.

Jax-free, so it can be used before jax starts (flags are read once, when the
CPU backend initialises).

Why the second flag: XLA:CPU runs one program per device on a thread pool and
starts every thunk as soon as its inputs are ready. Collectives inside a while
loop (a scan over layers) are not ordered against independent collectives
outside it, so one device can enter the loop's all-reduce (over a 2-device
group) while its partner enters a collective-permute over all 8 devices: each
waits for the other and XLA aborts the process after 40 s ("Termination
timeout for `collective permute` ... only 7 of them arrived"). Seen here with
the reward model's scanned step on a (2, 2, 2) mesh. The depth-first memory
scheduler (concurrency-optimized scheduler off) orders the program so that
this does not happen; it also keeps peak host memory lower. Other JAX projects
that fake CPU devices set the same flag for the same reason.

It is also faster on one device with two cores, so every `posttrain-jax`
command sets it (`default_cpu_flags`, before jax starts) unless XLA_FLAGS
already names it. The concurrency-optimized scheduler lets independent thunks
run at once, each with its own share of the thread pool, and on 2 cores the
matmuls then contend: real Gemma 3 270M SFT at 8 x 512 (`accum_steps=4`, idle,
`benchmarks/README.md`) 81.2 -> 87.8 tokens/s in an A/B, medians 81.6 -> 86.9 over two side-by-side runs
(6-8%), and 9.49 -> 8.91 GiB peak RSS; bench-small: speed within noise, 4.5 -> 3.7 GiB.
"""

from __future__ import annotations

SERIAL_COLLECTIVES = "--xla_cpu_enable_concurrency_optimized_scheduler=false"  # the depth-first scheduler


def default_cpu_flags(existing: str = "") -> str:
    """`existing` XLA_FLAGS plus `SERIAL_COLLECTIVES`, unless `existing` sets that flag either way.

    Only the CPU backend reads it, so it is harmless on TPU and GPU hosts; it takes effect only if
    set before jax initialises its backends. An XLA_FLAGS that names a flags file (XLA reads a value
    that does not start with "-" as a path) is returned unchanged."""
    if "xla_cpu_enable_concurrency_optimized_scheduler" in existing:
        return existing
    if existing.strip() and not existing.lstrip().startswith("-"):
        return existing
    return " ".join(f for f in (existing.strip(), SERIAL_COLLECTIVES) if f)


def host_device_flags(count: int, existing: str = "") -> str:
    """`existing` XLA_FLAGS plus `count` host CPU devices and `SERIAL_COLLECTIVES` (neither added twice)."""
    flags = [f for f in existing.split() if not f.startswith("--xla_force_host_platform_device_count")]
    flags.append(f"--xla_force_host_platform_device_count={count}")
    return default_cpu_flags(" ".join(flags))
