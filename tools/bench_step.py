#!/usr/bin/env python
"""Throughput of the jitted training step alone (device-resident batches).

Separates the step's own speed from the host pipeline that feeds it
(bench_train.py measures the whole trainer). Builds one working table of
``--rows`` rows, a few calls' worth of random edge batches with power-law
(Zipf) endpoints already on the device, and times ``--calls`` calls of T=16
steps each (translation + dot, logistic loss, the same code the trainer runs):

  python tools/bench_step.py --rows 1000000 --dim 128 --chunk 50 --uniform 50 --batch 1000
  python tools/bench_step.py --rows 4000000 --dim 100 --chunk 500 --uniform 500 --batch 10000

Prints a table, or one JSON object with --json: edges/s, seconds per call,
and the device's peak memory.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from twhin_jax import optim
from twhin_jax import sharding as sharding_lib
from twhin_jax import state as state_lib
from twhin_jax import step as step_lib
from twhin_jax.batching import STEPS_PER_CALL


def random_batches(rng, num: int, rows: int, chunk: int, per_step: int, relations: int,
                   shards: int):
  """``num`` StepBatches [G, T, S, C] with Zipf-distributed endpoints."""
  batches = []
  for _ in range(num):
    shape3 = (shards, STEPS_PER_CALL, per_step, chunk)
    shape2 = (shards, STEPS_PER_CALL, per_step)
    zipf = lambda: np.minimum(rng.zipf(1.3, shape3) - 1, rows - 1).astype(np.int32)
    # Scatter the popular ids over the table like the importer's shuffle does.
    perm = lambda x: ((x.astype(np.int64) * 2654435761) % rows).astype(np.int32)
    batches.append(step_lib.StepBatch(
        src=perm(zipf()), dst=perm(zipf()),
        rel=rng.integers(0, relations, shape2).astype(np.int32),
        weight=np.ones(shape3, np.float32),
        src_lo=np.zeros(shape2, np.int32), src_n=np.full(shape2, rows, np.int32),
        dst_lo=np.zeros(shape2, np.int32), dst_n=np.full(shape2, rows, np.int32),
        step_index=np.tile(np.arange(STEPS_PER_CALL, dtype=np.int32), (shards, 1)),
        rel_reverse=rng.integers(0, relations, shape2).astype(np.int32)))
  return batches


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rows", type=int, default=1_000_000)
  parser.add_argument("--dim", type=int, default=128)
  parser.add_argument("--chunk", type=int, default=50)
  parser.add_argument("--uniform", type=int, default=50)
  parser.add_argument("--batch", type=int, default=1000)
  parser.add_argument("--relations", type=int, default=4)
  parser.add_argument("--calls", type=int, default=20)
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args()

  mesh = sharding_lib.make_mesh(1)
  per_step = args.batch // args.chunk
  rng = np.random.default_rng(0)
  rows_sharding = sharding_lib.row_sharding(mesh)
  table = jax.device_put(
      jnp.asarray(rng.standard_normal((args.rows, args.dim), np.float32) * 1e-3), rows_sharding)
  acc = jax.device_put(jnp.zeros((args.rows,), jnp.float32), rows_sharding)
  params = jnp.zeros((args.relations, args.dim), jnp.float32)
  state = state_lib.StepState(state_lib.Rows(table, acc), None,
                              jax.device_put(params, sharding_lib.replicated(mesh)),
                              jax.device_put(optim.relation_adagrad(0.1).init(params),
                                             sharding_lib.replicated(mesh)))
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding_lib.AXIS))
  batches = [jax.device_put(b, batch_sharding)
             for b in random_batches(rng, 4, args.rows, args.chunk, per_step, args.relations, 1)]
  key = jax.device_put(jax.random.key_data(jax.random.key(0)), sharding_lib.replicated(mesh))
  fn = step_lib.make_train_steps("translation", "dot", "logistic", 0.1, 0.1, 0.1, args.uniform,
                                 True, 0.0, mesh=mesh, visiting=False)
  state, loss, edges = fn(state, batches[0], key)  # compile
  jax.block_until_ready(state)
  started = time.perf_counter()
  total = 0
  for i in range(args.calls):
    state, loss, edges = fn(state, batches[i % len(batches)], key)
    total += STEPS_PER_CALL * args.batch
  jax.block_until_ready(state)
  seconds = time.perf_counter() - started
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  result = {"device": f"{device.platform}:{getattr(device, 'device_kind', '')}",
            "rows": args.rows, "dim": args.dim, "chunk": args.chunk, "uniform": args.uniform,
            "batch": args.batch, "edges_per_s": total / seconds,
            "seconds_per_call": seconds / args.calls, "loss": float(loss) / float(edges),
            "device_peak_mib": stats.get("peak_bytes_in_use", 0) / 2 ** 20}
  if args.json:
    print(json.dumps(result))
  else:
    print("| device | rows | d | C + U negatives | batch | edges/s | s/call | device peak MiB |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    print(f"| {result['device']} | {args.rows:,} | {args.dim} | {args.chunk} + {args.uniform} | "
          f"{args.batch} | {result['edges_per_s']:,.0f} | {result['seconds_per_call']:.4f} | "
          f"{result['device_peak_mib']:,.0f} |")


if __name__ == "__main__":
  main()
