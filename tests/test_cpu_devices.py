"""XLA:CPU flags the commands set before jax starts (`posttrain_jax.cpu_devices`)."""

import os
import subprocess
import sys

from posttrain_jax.cpu_devices import SERIAL_COLLECTIVES, default_cpu_flags, host_device_flags


def test_default_cpu_flags_add_the_depth_first_scheduler_once_and_respect_the_user():
    assert default_cpu_flags("") == SERIAL_COLLECTIVES
    assert default_cpu_flags("--xla_cpu_foo=1 ") == f"--xla_cpu_foo=1 {SERIAL_COLLECTIVES}"
    assert default_cpu_flags(SERIAL_COLLECTIVES) == SERIAL_COLLECTIVES
    user = "--xla_cpu_enable_concurrency_optimized_scheduler=true"  # an explicit choice wins
    assert default_cpu_flags(user) == user
    assert default_cpu_flags("/etc/xla_flags.txt") == "/etc/xla_flags.txt"  # a flags file: XLA reads it as is
    flags = host_device_flags(8, "--xla_force_host_platform_device_count=2 --xla_cpu_foo=1").split()
    assert flags == ["--xla_cpu_foo=1", "--xla_force_host_platform_device_count=8", SERIAL_COLLECTIVES]
    assert host_device_flags(1).split() == ["--xla_force_host_platform_device_count=1", SERIAL_COLLECTIVES]


def test_the_cli_sets_the_cpu_defaults_before_jax_starts():
    code = ("import os, sys\nfrom posttrain_jax.cli import main\nassert 'jax' not in sys.modules\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\nprint(os.environ['XLA_FLAGS'])")
    for given, expected in (("", SERIAL_COLLECTIVES), ("--xla_cpu_foo=1", f"--xla_cpu_foo=1 {SERIAL_COLLECTIVES}"),
                            ("--xla_cpu_enable_concurrency_optimized_scheduler=true",
                             "--xla_cpu_enable_concurrency_optimized_scheduler=true")):
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "XLA_FLAGS": given},
                             capture_output=True, text=True, check=True).stdout
        assert out.strip().splitlines()[-1] == expected
