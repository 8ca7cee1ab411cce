"""Minimal reproduction: XLA:CPU deadlocks when more than 32 calls of a
multi-device program with an all-reduce are dispatched ahead (jax 0.10.2).

    python tools/repro_cpu_collective_stall.py            # hangs, then aborts
    python tools/repro_cpu_collective_stall.py --window 8 # finishes

Needs a machine (or a cgroup/taskset) with as many cores as fake devices: 2
here. It sets XLA_FLAGS itself (2 fake CPU devices; the rendezvous aborts the
process after 60 s instead of hanging forever).

What happens (gdb on the stuck process): the PjRt CPU client runs every
device's part of a multi-device program on one thread pool of
max(DefaultThreadPoolSize(), device count) = 2 threads. Launching a part first
takes one of the device's max_inflight_computations_per_device (32) slots, and
it waits for a free slot *on the pool thread* (Semaphore::ScopedAcquire in
CpuPjRtRawLoadedExecutable::Execute). Device 0's part of the oldest call sits
on the other thread, inside the all-reduce, waiting for device 1, whose part
can never get a thread: both pool threads wait on each other and the Python
thread waits in Execute. Tiny arrays suffice; any loop that does not wait on
its results runs ahead by more than 32 calls. Bounding the calls in flight
(--window) avoids it.
"""

import argparse
import os
import sys
import time

os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=2 "
                           "--xla_cpu_collective_call_terminate_timeout_seconds=60")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402 - after XLA_FLAGS
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--calls", type=int, default=64)
  parser.add_argument("--rows", type=int, default=1000, help="rows per device")
  parser.add_argument("--window", type=int, default=0,
                      help="wait for the call this many back (0: never wait)")
  args = parser.parse_args()
  print(f"jax {jax.__version__}, {os.cpu_count()} cores, devices {jax.devices()}", flush=True)
  mesh = Mesh(np.array(jax.devices()[:2]), ("d",))

  def body(x):
    x = jnp.tanh(x * 0.5 + 1.0)
    return x, jax.lax.psum(jnp.sum(x[:8]), "d")  # one all-reduce per call

  step = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("d"), out_specs=(P("d"), P())),
                 donate_argnums=0)
  x = jax.device_put(np.ones((2 * args.rows, 128), np.float32), NamedSharding(mesh, P("d")))
  started, sums = time.time(), []
  for _ in range(args.calls):
    x, total = step(x)
    sums.append(total)
    if args.window and len(sums) > args.window:
      sums[-args.window - 1].block_until_ready()
  jax.block_until_ready(sums)
  print(f"ok: {args.calls} calls in {time.time() - started:.2f} s", flush=True)


if __name__ == "__main__":
  sys.exit(main())
