"""Multi-host start-up: ``jax.distributed.initialize`` from the launcher's variables.

The launch scripts (launch/) set, per process,

  TWHIN_COORDINATOR_ADDRESS   host:port of process 0's coordinator service
  TWHIN_NUM_PROCESSES         number of processes in the job
  TWHIN_PROCESS_ID            this process's index, 0 .. N-1
  TWHIN_LOCAL_DEVICE_IDS      optional: comma-separated local device ids

and ``twhin train --distributed`` calls :func:`initialize`. Without these
variables jax detects the cluster itself (SLURM, Cloud TPU pods, Open MPI).
Afterwards every process sees the devices of all processes (``jax.devices()``)
and the trainer builds one mesh over them (sharding.py). On CPU the
collectives go through gloo (jax's default), so a multi-process run also
works on one machine, which the tests use.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

ENV_COORDINATOR = "TWHIN_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "TWHIN_NUM_PROCESSES"
ENV_PROCESS_ID = "TWHIN_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "TWHIN_LOCAL_DEVICE_IDS"


def settings_from_env(environ=os.environ) -> dict:
  """Arguments for jax.distributed.initialize from the TWHIN_* variables.

  All three of coordinator, count and id, or none (then jax auto-detects);
  a partial set is a launcher bug and raises a ValueError naming what is missing.
  """
  names = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
  present = [n for n in names if environ.get(n)]
  if not present:
    return {}
  missing = [n for n in names if not environ.get(n)]
  if missing:
    raise ValueError(f"distributed launch: {', '.join(present)} set but {', '.join(missing)} "
                     "missing (set all three, or none to let jax detect the cluster)")
  try:
    num, index = int(environ[ENV_NUM_PROCESSES]), int(environ[ENV_PROCESS_ID])
  except ValueError as err:
    raise ValueError(f"{ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} must be integers: {err}") from err
  if not 0 <= index < num:
    raise ValueError(f"{ENV_PROCESS_ID}={index} is outside 0..{num - 1}")
  settings = {"coordinator_address": environ[ENV_COORDINATOR], "num_processes": num,
              "process_id": index}
  if environ.get(ENV_LOCAL_DEVICE_IDS):
    settings["local_device_ids"] = [int(x) for x in environ[ENV_LOCAL_DEVICE_IDS].split(",")]
  return settings


def initialize() -> dict:
  """Joins the job; returns a summary that every process also prints."""
  settings = settings_from_env()
  jax.distributed.initialize(**settings)
  summary = {"process_index": jax.process_index(), "process_count": jax.process_count(),
             "local_devices": [str(d) for d in jax.local_devices()],
             "global_devices": jax.device_count(),
             "coordinator": settings.get("coordinator_address", "auto-detected")}
  print(f"[twhin] process {summary['process_index']} of {summary['process_count']}, "
        f"local devices {summary['local_devices']}, {summary['global_devices']} in all, "
        f"coordinator {summary['coordinator']}", flush=True)
  return summary


def sync(name: str) -> None:
  """A barrier across processes (a no-op in a single process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # only with several processes
    multihost_utils.sync_global_devices(name)


def broadcast_json(value):
  """The primary process's value of a JSON-able object, on every process."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils  # only with several processes
  data = np.frombuffer(json.dumps(value).encode(), np.uint8)
  size = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
  padded = np.zeros(size, np.uint8)
  padded[:min(size, len(data))] = data[:size]
  return json.loads(bytes(multihost_utils.broadcast_one_to_all(padded)).decode())
