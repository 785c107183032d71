#!/usr/bin/env python3
"""Set up .venv and run: `python3 dev.py quickstart` or `python3 dev.py test [pytest args]`.

Needs nothing but Python >= 3.11: creates .venv, installs the package (and for
tests the CPU build of torch plus transformers for parity checks), then runs.
Re-running skips installs whose inputs did not change.
"""

import hashlib
import os
import subprocess
import sys
import venv

ROOT = os.path.dirname(os.path.abspath(__file__))
VENV = os.path.join(ROOT, ".venv")
BIN = os.path.join(VENV, "Scripts" if os.name == "nt" else "bin")
PY = os.path.join(BIN, "python")


def run(*cmd, **kw):
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, **kw)


def install(extra: str) -> None:
    if sys.version_info < (3, 11):
        sys.exit(f"posttrain_jax needs Python >= 3.11, this is {sys.version.split()[0]}")
    if not os.path.exists(PY):
        venv.create(VENV, with_pip=True)
        run(PY, "-m", "pip", "install", "-q", "--upgrade", "pip")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        digest = hashlib.sha256(f.read() + extra.encode()).hexdigest()[:16]
    stamp = os.path.join(VENV, f".installed-{extra or 'base'}")
    if os.path.exists(stamp) and open(stamp).read() == digest:
        return
    if extra == "test":
        # The CPU build first, so transformers does not pull a CUDA torch.
        run(PY, "-m", "pip", "install", "-q", "torch==2.13.0")
    run(PY, "-m", "pip", "install", "-q", "-e", f".[{extra}]" if extra else ".")
    with open(stamp, "w") as f:
        f.write(digest)


def parallel(args: list[str]) -> list[str]:
    """pytest-xdist workers, one per core up to 4 and ~6 GiB of RAM each (a worker holds 8 fake devices and
    peaks near 5 GiB); whole files per worker, so module fixtures are built once. `-n N` or `-p no:xdist`
    in args wins; POSTTRAIN_JAX_TEST_WORKERS overrides the count."""
    if any(a.startswith(("-n", "--numprocesses")) or a == "no:xdist" for a in args):
        return []
    try:
        ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        ram_gib = 8.0
    workers = int(os.environ.get("POSTTRAIN_JAX_TEST_WORKERS") or min(os.cpu_count() or 1, 4, int(ram_gib // 6)))
    return ["-n", str(workers), "--dist", "loadfile"] if workers > 1 else []


def main() -> None:
    command, args = (sys.argv[1] if len(sys.argv) > 1 else "quickstart"), sys.argv[2:]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        if command == "quickstart":
            install("")
            run(os.path.join(BIN, "posttrain-jax"), "sft", *args, env=env)
        elif command == "test":
            install("test")
            run(PY, "-m", "pytest", *(args or ["-q"]), *parallel(args), env=env)
        else:
            sys.exit(f"usage: python3 dev.py [quickstart|test] [args...]; got {command!r}")
    except subprocess.CalledProcessError as e:
        sys.exit(e.returncode)


if __name__ == "__main__":
    main()
