#!/usr/bin/env python
"""Throughput of the jitted training step alone (device-resident batches).

Separates the step's own speed from the host pipeline that feeds it
(bench_train.py measures the whole trainer). Builds one working table of
``--rows`` rows, a few calls' worth of random edge batches with power-law
(Zipf) endpoints already on the device, and times ``--calls`` calls of T=16
steps each (translation + dot, logistic loss, the same code the trainer runs):

  python tools/bench_step.py --rows 1000000 --dim 128 --chunk 50 --uniform 50 --batch 1000
  python tools/bench_step.py --rows 4000000 --dim 100 --chunk 500 --uniform 500 --batch 10000
  python tools/bench_step.py --precision bfloat16     # score matmuls in bf16 (model.matmul_precision)
  XLA_FLAGS=--xla_force_host_platform_device_count=2 \
    python tools/bench_step.py --rows 14541 --dim 200 --relations 474 --data-parallel 2

``--data-parallel G`` also times an exact data-parallel variant of the step
over G devices (data_parallel_steps below) against the plain step, in
alternating rounds, and prints the ratio and how far apart the two tables end
up (float summation order only).

Prints a table, or one JSON object with --json: edges/s, seconds per call,
and the device's peak memory.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from twhin_jax import model
from twhin_jax import negatives
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


def data_parallel_steps(settings: step_lib.StepSettings, mesh: jax.sharding.Mesh):
  """An exact data-parallel step over the mesh's G devices, as an experiment.

  Every device holds the whole working table (replicated). Each draws the
  step's negatives with the step's one key, so the step's candidates are the
  single-device step's; device g takes chunks [g S/G, (g+1) S/G) of the S,
  computes the loss gradients of their rows, and all-gathers them (ids and
  [S/G, C+U, d] gradients per side). Every device then applies the same
  row-wise Adagrad update to all S chunks' rows (step.update_rows), so the
  replicas stay equal and the model is the one-device model up to the order
  of the gradient sums. Plain settings only: no global candidates, dropout
  or visiting table."""
  axis = sharding_lib.AXIS

  def one_step(carry, batch):
    state, key = carry
    devices, me = jax.lax.axis_size(axis), jax.lax.axis_index(axis)
    step_key = jax.random.fold_in(key, batch.step_index)
    src_key, dst_key = jax.random.split(step_key)
    src_ids = jnp.concatenate([batch.src, negatives.draw_uniform(
        src_key, batch.src_lo, batch.src_n, settings.num_uniform)], axis=1)  # [S, C+U]
    dst_ids = jnp.concatenate([batch.dst, negatives.draw_uniform(
        dst_key, batch.dst_lo, batch.dst_n, settings.num_uniform)], axis=1)  # [S, C+U]
    share = src_ids.shape[0] // devices
    mine = lambda x: jax.lax.dynamic_slice_in_dim(x, me * share, share, 0)
    valid = jnp.ones((share, settings.num_uniform), bool)
    my_src, my_dst = mine(src_ids), mine(dst_ids)
    loss, (src_grads, dst_grads, param_grads) = jax.value_and_grad(
        functools.partial(step_lib.step_loss, settings), argnums=(0, 1, 2))(
            state.home.table.at[my_src].get(mode="clip"),
            state.home.table.at[my_dst].get(mode="clip"), state.rel_params, my_src, my_dst,
            mine(batch.rel), mine(batch.rel_reverse), mine(batch.weight),
            jax.tree_util.tree_map(mine, negatives.log_q(batch)), valid, valid)
    src_grads = jax.lax.all_gather(src_grads, axis, tiled=True)  # [S, C+U, d]
    dst_grads = jax.lax.all_gather(dst_grads, axis, tiled=True)
    home, _ = step_lib.update_rows(settings, state, src_ids, dst_ids, src_grads, dst_grads)
    updates, rel_opt = optim.relation_adagrad(settings.relation_lr).update(
        jax.lax.psum(param_grads, axis), state.rel_opt, state.rel_params)
    state = state_lib.StepState(home, None, optax.apply_updates(state.rel_params, updates),
                                rel_opt)
    return (state, key), (jax.lax.psum(loss, axis), jnp.sum(batch.weight > 0))

  def call(state, batch, key):
    batch = jax.tree_util.tree_map(lambda x: x[0], batch)  # [T, S, C]: every device, all of it
    (state, _), (losses, edges) = jax.lax.scan(
        one_step, (state, jax.random.wrap_key_data(key)), batch)
    return state, jnp.sum(losses), jnp.sum(edges)

  replicated = sharding_lib.REPLICATED
  return jax.jit(jax.shard_map(call, mesh=mesh, in_specs=(replicated,) * 3,
                               out_specs=(replicated,) * 3, check_vma=False),
                 donate_argnums=(0,))


def compare_data_parallel(args, state, batches, key, devices: int) -> dict:
  """Plain step on one device against data_parallel_steps on ``devices``,
  timed in alternating rounds from the same state and batches."""
  if len(jax.devices()) < devices:
    raise SystemExit(f"--data-parallel {devices} needs {devices} devices; on CPU set "
                     f"XLA_FLAGS=--xla_force_host_platform_device_count={devices}")
  if (args.batch // args.chunk) % devices:
    raise SystemExit(f"--data-parallel {devices}: the {args.batch // args.chunk} chunks of a step "
                     "must split evenly over the devices")
  # The settings make_train_steps gives the one-device step (no mesh).
  settings = step_lib.StepSettings(
      operator="translation", comparator="dot", loss="logistic", margin=0.1, lr=0.1,
      relation_lr=0.1, num_uniform=args.uniform, reciprocal=True, regularization=0.0,
      l2_to_previous=0.0, sharded=False,
      matmul_precision=model.resolve_matmul_precision(args.precision), skip_padding=True)
  one_device = step_lib.make_train_steps("translation", "dot", "logistic", 0.1, 0.1, 0.1,
                                         args.uniform, True, 0.0, mesh=None,
                                         matmul_precision=args.precision)
  mesh = sharding_lib.make_mesh(devices)
  parallel = data_parallel_steps(settings, mesh)
  variants = {
      "one device": (one_device, jax.devices()[0], jax.random.wrap_key_data(np.asarray(key)),
                     lambda b: jax.tree_util.tree_map(lambda x: x[0], b)),
      f"data-parallel x{devices}": (parallel, sharding_lib.replicated(mesh), np.asarray(key),
                                     lambda b: b)}
  host_state = jax.tree_util.tree_map(np.asarray, state)
  host_batches = [jax.tree_util.tree_map(np.asarray, b) for b in batches]
  rates = {name: [] for name in variants}
  tables = {}
  for _ in range(args.rounds):
    for name, (fn, where, k, shape) in variants.items():
      st = jax.device_put(host_state, where)
      bs = [jax.device_put(shape(b), where) for b in host_batches]
      k = jax.device_put(k, where)
      st, loss, edges = fn(st, bs[0], k)  # compile (cached after the first round)
      jax.block_until_ready(st)
      st = jax.device_put(host_state, where)
      started = time.perf_counter()
      for i in range(args.calls):
        st, loss, edges = fn(st, bs[i % len(bs)], k)
      jax.block_until_ready(st)
      rates[name].append(args.calls * STEPS_PER_CALL * args.batch / (time.perf_counter() - started))
      tables[name] = np.asarray(st.home.table)
  (one, one_rates), (dp, dp_rates) = rates.items()
  return {"devices": devices, "one_device_edges_per_s": one_rates,
          "data_parallel_edges_per_s": dp_rates,
          "ratio": float(np.mean(dp_rates) / np.mean(one_rates)),
          "max_abs_table_difference": float(np.max(np.abs(tables[one] - tables[dp]))),
          "max_abs_table": float(np.max(np.abs(tables[one])))}


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
  parser.add_argument("--precision", default="auto", choices=model.MATMUL_PRECISIONS,
                      help="score matmuls (config.model.matmul_precision; auto: per backend)")
  parser.add_argument("--data-parallel", type=int, default=0, metavar="G",
                      help="also time data_parallel_steps on G devices against one device")
  parser.add_argument("--rounds", type=int, default=2,
                      help="alternating rounds of the --data-parallel comparison")
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
                                 True, 0.0, mesh=mesh, visiting=False,
                                 matmul_precision=args.precision)
  if args.data_parallel:
    result = compare_data_parallel(args, state, batches, key, args.data_parallel)
    if args.json:
      print(json.dumps(result))
      return
    print("| variant | edges/s (each round) | mean |")
    print("|---|---|---:|")
    for name, rates in (("one device", result["one_device_edges_per_s"]),
                        (f"data-parallel x{args.data_parallel}",
                         result["data_parallel_edges_per_s"])):
      print(f"| {name} | {', '.join(f'{r:,.0f}' for r in rates)} | {np.mean(rates):,.0f} |")
    print(f"\nratio {result['ratio']:.2f}; tables differ by at most "
          f"{result['max_abs_table_difference']:.2e} (largest entry {result['max_abs_table']:.2e})")
    return
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
            "batch": args.batch,
            "precision": model.resolve_matmul_precision(args.precision),
            "edges_per_s": total / seconds,
            "seconds_per_call": seconds / args.calls, "loss": float(loss) / float(edges),
            "device_peak_mib": stats.get("peak_bytes_in_use", 0) / 2 ** 20}
  if args.json:
    print(json.dumps(result))
  else:
    print("| device | rows | d | C + U negatives | batch | matmuls | edges/s | s/call | "
          "device peak MiB |")
    print("|---|---:|---:|---|---:|---|---:|---:|---:|")
    print(f"| {result['device']} | {args.rows:,} | {args.dim} | {args.chunk} + {args.uniform} | "
          f"{args.batch} | {result['precision']} | {result['edges_per_s']:,.0f} | {result['seconds_per_call']:.4f} | "
          f"{result['device_peak_mib']:,.0f} |")


if __name__ == "__main__":
  main()
