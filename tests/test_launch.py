"""The launch scripts: syntax, fail-fast messages, dry-run commands, and the
multi-process launcher's failure handling (with a stand-in for twhin)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time

import pytest

LAUNCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch")
SCRIPTS = ["local.sh", "local_multiprocess.sh", "slurm.sbatch", "tpu_pod.sh",
           "gpu_multinode.sh", "lib.sh"]

#: Script -> every variable it requires, with values that satisfy it.
REQUIRED = {
    "local.sh": {"CONFIG": "c.py", "WORKDIR": "w"},
    "local_multiprocess.sh": {"NUM_PROCESSES": "2", "CONFIG": "c.py", "WORKDIR": "w"},
    "slurm.sbatch": {"CONFIG": "c.py", "WORKDIR": "w", "NNODES": "2"},
    "tpu_pod.sh": {"TPU_NAME": "pod", "ZONE": "us-central2-b", "CONFIG": "c.py", "WORKDIR": "w"},
    "gpu_multinode.sh": {"HOSTS": "a b", "CONFIG": "c.py", "WORKDIR": "w"},
}

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run(script: str, env: dict, *args: str, timeout: float = 20) -> subprocess.CompletedProcess:
  base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
  return subprocess.run(["bash", os.path.join(LAUNCH, script), *args], env={**base, **env},
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("script", SCRIPTS)
def test_syntax(script):
  path = os.path.join(LAUNCH, script)
  subprocess.run(["bash", "-n", path], check=True)
  with open(path) as f:
    text = f.read()
  assert "set -euo pipefail" in text or script == "lib.sh"


@pytest.mark.parametrize("script,missing",
                         [(s, v) for s, required in REQUIRED.items() for v in required])
def test_missing_variable_fails_naming_it(script, missing):
  env = {k: v for k, v in REQUIRED[script].items() if k != missing}
  result = run(script, {**env, "DRY_RUN": "1"})
  assert result.returncode != 0
  assert missing in result.stderr
  assert result.stdout == ""  # nothing was printed or started


def test_local_dry_run():
  out = run("local.sh", {"CONFIG": "configs/kinship.py:test", "WORKDIR": "runs/k",
                         "DRY_RUN": "1", "TWHIN": "python -m twhin_jax.cli"},
            "--config.train.lr=0.05")
  assert out.returncode == 0, out.stderr
  assert shlex.split(out.stdout) == ["python", "-m", "twhin_jax.cli", "train", "--config",
                                     "configs/kinship.py:test", "--workdir", "runs/k",
                                     "--config.train.lr=0.05"]


def test_local_multiprocess_dry_run():
  out = run("local_multiprocess.sh", {"NUM_PROCESSES": "3", "CONFIG": "c.py", "WORKDIR": "w",
                                      "DRY_RUN": "1", "PORT": "4321",
                                      "DEVICES_PER_PROCESS": "2"}, "--config.x=1")
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 3
  for i, line in enumerate(lines):
    words = shlex.split(line)
    assert words[0] == "env"
    assert "TWHIN_COORDINATOR_ADDRESS=127.0.0.1:4321" in words
    assert "TWHIN_NUM_PROCESSES=3" in words
    assert f"TWHIN_PROCESS_ID={i}" in words
    assert "JAX_PLATFORMS=cpu" in words
    assert "XLA_FLAGS=--xla_force_host_platform_device_count=2" in words
    start = words.index("twhin")
    assert words[start:] == ["twhin", "train", "--distributed", "--config", "c.py",
                             "--workdir", "w", "--config.x=1"]


def test_local_multiprocess_rejects_bad_count():
  out = run("local_multiprocess.sh", {"NUM_PROCESSES": "zero", "CONFIG": "c", "WORKDIR": "w"})
  assert out.returncode != 0 and "NUM_PROCESSES" in out.stderr


def test_local_multiprocess_propagates_failure_and_stops_the_rest(tmp_path):
  """Process 1 fails with status 3; the launcher exits 3 at once and stops 0 and 2."""
  fake = tmp_path / "fake_twhin.sh"
  fake.write_text("#!/usr/bin/env bash\n"
                  "echo \"$TWHIN_PROCESS_ID $TWHIN_NUM_PROCESSES $TWHIN_COORDINATOR_ADDRESS $*\"\n"
                  "if [[ $TWHIN_PROCESS_ID == 1 ]]; then sleep 0.3; exit 3; fi\n"
                  "exec sleep 60\n")
  fake.chmod(0o755)
  started = time.monotonic()
  out = run("local_multiprocess.sh", {"NUM_PROCESSES": "3", "CONFIG": "c.py",
                                      "WORKDIR": str(tmp_path / "w"), "TWHIN": str(fake),
                                      "KILL_GRACE_S": "2"}, timeout=30)
  assert out.returncode == 3, (out.stdout, out.stderr)
  assert time.monotonic() - started < 15
  assert "failed (exit 3)" in out.stderr
  for i in range(3):
    assert f"[process {i}] {i} 3 127.0.0.1:12355 train --distributed" in out.stdout
    assert (tmp_path / "w" / "logs" / f"process_{i}.log").exists()


def test_local_multiprocess_all_succeed(tmp_path):
  fake = tmp_path / "ok.sh"
  fake.write_text("#!/usr/bin/env bash\necho ok $TWHIN_PROCESS_ID\n")
  fake.chmod(0o755)
  out = run("local_multiprocess.sh", {"NUM_PROCESSES": "2", "CONFIG": "c.py",
                                      "WORKDIR": str(tmp_path / "w"), "TWHIN": str(fake)})
  assert out.returncode == 0, out.stderr
  assert "[process 0] ok 0" in out.stdout and "[process 1] ok 1" in out.stdout


def test_slurm_submit_and_task_commands(tmp_path):
  submit = run("slurm.sbatch", {"NNODES": "4", "CONFIG": "c.py", "WORKDIR": "w",
                                "ACCOUNT": "team", "DRY_RUN": "1"})
  assert submit.returncode == 0, submit.stderr
  words = shlex.split(submit.stdout)
  assert words[0] == "sbatch" and "--nodes=4" in words and "--account=team" in words
  assert "--partition=gpu" in words and words[-1].endswith("slurm.sbatch")
  # Inside the allocation: the coordinator is the first host scontrol lists.
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "scontrol").write_text("#!/bin/sh\necho node-7\necho node-8\n")
  (bin_dir / "scontrol").chmod(0o755)
  inside = subprocess.run(
      ["bash", os.path.join(LAUNCH, "slurm.sbatch")], capture_output=True, text=True,
      env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "11",
           "SLURM_JOB_NODELIST": "node-[7-8]", "SLURM_NTASKS": "2", "CONFIG": "c.py",
           "WORKDIR": "w", "DRY_RUN": "1"}, timeout=20)
  assert inside.returncode == 0, inside.stderr
  assert "coordinator node-7:12355" in inside.stderr
  words = shlex.split(inside.stdout)
  assert words[:3] == ["srun", "--ntasks=2", "--kill-on-bad-exit=1"]
  assert words[-7:] == ["twhin", "train", "--distributed", "--config", "c.py", "--workdir", "w"]
  # The per-task wrapper reads SLURM_PROCID.
  task = words[3:]
  probe = subprocess.run(task[:4] + ["env"], capture_output=True, text=True,
                         env={"PATH": os.environ["PATH"], "SLURM_PROCID": "1"}, timeout=20)
  assert "TWHIN_PROCESS_ID=1" in probe.stdout.splitlines()


def test_gpu_multinode_and_tpu_dry_run():
  out = run("gpu_multinode.sh", {"HOSTS": "g1,g2", "CONFIG": "c.py", "WORKDIR": "/s/w",
                                 "REMOTE_DIR": "/srv/twhin", "DRY_RUN": "1"})
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 2
  for i, (line, host) in enumerate(zip(lines, ["g1", "g2"])):
    words = shlex.split(line)
    assert words[0] == "ssh" and words[-2] == host
    remote = shlex.split(words[-1])
    assert remote[:3] == ["cd", "/srv/twhin", "&&"]
    assert "TWHIN_COORDINATOR_ADDRESS=g1:12355" in remote
    assert f"TWHIN_PROCESS_ID={i}" in remote and "TWHIN_NUM_PROCESSES=2" in remote
    assert "--distributed" in remote
  tpu = run("tpu_pod.sh", {"TPU_NAME": "pod", "ZONE": "z", "CONFIG": "c.py", "WORKDIR": "w",
                           "DRY_RUN": "1", "STEPS": "train"})
  assert tpu.returncode == 0, tpu.stderr
  words = shlex.split(tpu.stdout)
  assert words[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"]
  assert "--worker=all" in words and "TWHIN_" not in tpu.stdout
  assert "--distributed" in words[-1]
