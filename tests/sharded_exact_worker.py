"""Run in its own process by tests/test_sharded_exact.py (jax must see 4 CPU
devices before it is imported). Measures how far sharded training departs
from references that it must match, and prints one JSON object:

  step_local, step_visiting   one G-device call of the ring's round-0 step and
                              of a visiting-round step (same-type rows, L2 to
                              previous on) against a dense reference written
                              here independently (plain jax loss + numpy
                              row-wise Adagrad, proximal step, relation Adagrad)
  replicas                    relation parameters and their Adagrad state on
                              every device after several calls (must be
                              bit-identical)
  target_only                 a whole bucket on G devices through the trainer
                              (G rounds, ppermute ring, merge) against the
                              same calls replayed by the single-device step
                              on the concatenated table (a graph whose target
                              type is never a source: exact up to float order)
  tournament                  the same with mesh.schedule = "tournament" on a
                              graph where users also follow users (2G - 1
                              rounds, slot moves; exact for any graph), with
                              one Adagrad accumulator per coordinate

Every figure is a max absolute difference (float64 comparison) plus the scale
of the change it is measured against, so the test can tell "equal up to float
order" from "an update went missing".
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from twhin_jax import batching
from twhin_jax import config as config_lib
from twhin_jax import device_schedule
from twhin_jax import optim
from twhin_jax import sharding as sharding_lib
from twhin_jax import state as state_lib
from twhin_jax import step as step_lib
from twhin_jax import train as train_lib

G = 4
R, D = 24, 8  # rows of one shard, embedding dim
T, S, C, U = 2, 2, 4, 2  # steps per call, chunks per step, edges per chunk, uniform negatives
LR, REL_LR, ALPHA = 0.1, 0.05, 0.7
NUM_REL = 3
EPS = optim.ADAGRAD_EPS


# --------------------------------------------------------------------------
# Dense reference (translation operator, dot comparator, logistic loss).


def chunk_loss(src_rows, dst_rows, uni_src, uni_dst, p, src_ids, dst_ids, src_lo, dst_lo, w):
  """Loss of one chunk, written pair by pair from the definitions:

    f(s, r, t) = (theta_s + p_r) . theta_t
    L = - sum_i w_i [ log s(f_i) + mean_{j in N_i} log s(-f_ij) ]  per side,

  N_i: the chunk's other real edges' entities and the U uniform draws, minus
  any candidate equal to edge i's own entity on that side."""
  lhs = src_rows + p  # [C, d]
  pos = jnp.sum(lhs * dst_rows, axis=1)  # [C]
  real = w > 0
  total = 0.0
  for i in range(C):
    # Target corruption: (theta_s_i + p) . theta_t for t in chunk targets + uniform.
    cand_t = jnp.concatenate([dst_rows, uni_dst])  # [C+U, d]
    ids_t = jnp.concatenate([dst_ids, jnp.full((U,), dst_lo)])
    ok_t = jnp.concatenate([real, jnp.ones((U,), bool)]) & (ids_t != dst_ids[i])
    scores_t = cand_t @ lhs[i]
    neg_t = jnp.sum(jnp.where(ok_t, jax.nn.log_sigmoid(-scores_t), 0.0)) / jnp.maximum(
        jnp.sum(ok_t), 1)
    # Source corruption: (theta_s + p) . theta_t_i for s in chunk sources + uniform.
    cand_s = jnp.concatenate([src_rows, uni_src]) + p  # [C+U, d]
    ids_s = jnp.concatenate([src_ids, jnp.full((U,), src_lo)])
    ok_s = jnp.concatenate([real, jnp.ones((U,), bool)]) & (ids_s != src_ids[i])
    scores_s = cand_s @ dst_rows[i]
    neg_s = jnp.sum(jnp.where(ok_s, jax.nn.log_sigmoid(-scores_s), 0.0)) / jnp.maximum(
        jnp.sum(ok_s), 1)
    total = total - w[i] * (2.0 * jax.nn.log_sigmoid(pos[i]) + neg_t + neg_s)
  return total


def device_loss(home, visiting, params, src, dst, rel, weight, src_lo, dst_lo):
  """One device's loss of one step: sources from ``home``, targets from ``visiting``."""
  total = 0.0
  for s in range(S):
    total = total + chunk_loss(home[src[s]], visiting[dst[s]],
                               home[jnp.full((U,), src_lo[s])], visiting[jnp.full((U,), dst_lo[s])],
                               params[rel[s]], src[s], dst[s], src_lo[s], dst_lo[s], weight[s])
  return total


dense_grads = jax.jit(jax.grad(device_loss, argnums=(0, 1, 2)))


def dense_row_update(table, acc, grad, touched, anchor=None, anchor_weight=None):
  """Row-wise Adagrad on the touched rows, then the L2-to-previous proximal step:

    G_i <- G_i + mean_k g_ik^2,  eta_i = lr / (sqrt(G_i) + eps)
    theta_i <- theta_i - eta_i g_i
    theta_i <- (theta_i + 2 alpha w_i eta_i prev_i) / (1 + 2 alpha w_i eta_i)
  """
  table, acc = table.copy(), acc.copy()
  acc[touched] += np.mean(np.square(grad[touched]), axis=1)
  eta = LR / (np.sqrt(acc[touched]) + EPS)
  rows = table[touched] - eta[:, None] * grad[touched]
  if anchor is not None:
    pull = 2.0 * ALPHA * anchor_weight[touched] * eta
    rows = (rows + pull[:, None] * anchor[touched]) / (1.0 + pull[:, None])
  table[touched] = rows
  return table, acc


def dense_relation_update(params, acc, grad):
  """Adagrad from a zero accumulator: G <- G + g^2, p <- p - lr g / sqrt(G + eps)."""
  acc = acc + np.square(grad)
  return params - REL_LR * grad / np.sqrt(acc + EPS), acc


def dense_call(home, home_acc, visiting, visiting_acc, params, rel_acc, batch, anchors, local):
  """The reference of one call: per device [G, R, ...] arrays, T steps.

  ``local``: round 0, sources and targets index one table (``home``) and a row
  gets the sum of both sides' gradients. Otherwise targets index the visiting
  copy, updated on its own. Relation gradients are summed over the devices."""
  home, home_acc = home.astype(np.float64), home_acc.astype(np.float64)
  visiting = None if local else visiting.astype(np.float64)
  visiting_acc = None if local else visiting_acc.astype(np.float64)
  params, rel_acc = params.astype(np.float64), rel_acc.astype(np.float64)
  for t in range(T):
    rel_grad = np.zeros_like(params)
    new = []
    for g in range(G):
      src, dst, rel, weight, src_lo, dst_lo = (np.asarray(x)[g, t] for x in (
          batch.src, batch.dst, batch.rel, batch.weight, batch.src_lo, batch.dst_lo))
      target_table = home[g] if local else visiting[g]
      g_home, g_vis, g_rel = (np.asarray(x, np.float64) for x in dense_grads(
          jnp.asarray(home[g], jnp.float32), jnp.asarray(target_table, jnp.float32),
          jnp.asarray(params, jnp.float32), src, dst, rel, weight, src_lo, dst_lo))
      rel_grad += g_rel
      src_touched = np.zeros(R, bool)
      src_touched[np.concatenate([src.ravel(), src_lo])] = True
      dst_touched = np.zeros(R, bool)
      dst_touched[np.concatenate([dst.ravel(), dst_lo])] = True
      if local:
        h, ha = dense_row_update(home[g], home_acc[g], g_home + g_vis, src_touched | dst_touched,
                                 anchors["home"][g], anchors["home_w"][g])
        new.append((h, ha, None, None))
      else:
        h, ha = dense_row_update(home[g], home_acc[g], g_home, src_touched,
                                 anchors["home"][g], anchors["home_w"][g])
        v, va = dense_row_update(visiting[g], visiting_acc[g], g_vis, dst_touched,
                                 anchors["visiting"][g], anchors["visiting_w"][g])
        new.append((h, ha, v, va))
    home = np.stack([n[0] for n in new])
    home_acc = np.stack([n[1] for n in new])
    if not local:
      visiting = np.stack([n[2] for n in new])
      visiting_acc = np.stack([n[3] for n in new])
    params, rel_acc = dense_relation_update(params, rel_acc, rel_grad)
  return home, home_acc, visiting, visiting_acc, params, rel_acc


# --------------------------------------------------------------------------
# The sharded step on random inputs.


def random_batch(rng) -> step_lib.StepBatch:
  """[G, T, S, C] batches of one entity type: sources and targets from
  overlapping row pools (a row is often source and target), a few padded
  edges; uniform ranges of one row make the uniform draws deterministic."""
  shape3, shape2 = (G, T, S, C), (G, T, S)
  src = rng.integers(0, 14, shape3).astype(np.int32)
  dst = rng.integers(8, 20, shape3).astype(np.int32)
  weight = rng.uniform(0.5, 2.0, shape3).astype(np.float32)
  weight[:, 0, 1, 2:] = 0.0  # padded tail of a chunk
  src[weight == 0], dst[weight == 0] = 22, 23  # padding rows
  return step_lib.StepBatch(
      src=src, dst=dst, rel=rng.integers(0, NUM_REL - 1, shape2).astype(np.int32),
      weight=weight,
      src_lo=rng.choice([3, 20], shape2).astype(np.int32), src_n=np.ones(shape2, np.int32),
      dst_lo=rng.choice([9, 21], shape2).astype(np.int32), dst_n=np.ones(shape2, np.int32),
      step_index=np.broadcast_to(np.arange(T, dtype=np.int32), (G, T)).copy())


def step_checks(mesh) -> dict:
  rng = np.random.default_rng(0)
  rows = NamedSharding(mesh, sharding_lib.ROWS)
  replicated = NamedSharding(mesh, PartitionSpec())
  on_rows = lambda x: jax.device_put(np.asarray(x).reshape((G * R,) + x.shape[2:]), rows)
  out = {}
  replica_spread = {}
  for variant in ("local", "visiting"):
    local = variant == "local"
    fn = step_lib.make_train_steps("translation", "dot", "logistic", 0.1, LR, REL_LR, U,
                                   mesh=mesh, visiting=not local, l2_to_previous=ALPHA)
    home = (0.3 * rng.standard_normal((G, R, D))).astype(np.float32)
    home_acc = rng.uniform(0.05, 0.5, (G, R)).astype(np.float32)
    visiting = (0.3 * rng.standard_normal((G, R, D))).astype(np.float32)
    visiting_acc = rng.uniform(0.05, 0.5, (G, R)).astype(np.float32)
    anchors = {"home": (0.3 * rng.standard_normal((G, R, D))).astype(np.float32),
               "home_w": (rng.uniform(size=(G, R)) < 0.7).astype(np.float32),
               "visiting": (0.3 * rng.standard_normal((G, R, D))).astype(np.float32),
               "visiting_w": (rng.uniform(size=(G, R)) < 0.7).astype(np.float32)}
    params = (0.1 * rng.standard_normal((NUM_REL, D))).astype(np.float32)
    rel_opt = optim.relation_adagrad(REL_LR).init(jnp.asarray(params))
    state = state_lib.StepState(
        home=state_lib.Rows(on_rows(home), on_rows(home_acc), on_rows(anchors["home"]),
                            on_rows(anchors["home_w"])),
        visiting=None if local else state_lib.Rows(
            on_rows(visiting), on_rows(visiting_acc), on_rows(anchors["visiting"]),
            on_rows(anchors["visiting_w"])),
        rel_params=jax.device_put(params, replicated),
        rel_opt=jax.device_put(rel_opt, replicated))
    ref = (home, home_acc, visiting, visiting_acc, params, np.zeros_like(params))
    key = jax.device_put(jax.random.key_data(jax.random.key(7)), replicated)
    spread = 0.0
    for _ in range(3):  # several calls: replicas must not drift apart
      batch = random_batch(rng)
      ref = dense_call(*ref[:4], ref[4], ref[5], batch, anchors, local)
      state, _, _ = fn(state, jax.tree_util.tree_map(
          lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec(sharding_lib.AXIS))),
          batch), key)
      for leaf in jax.tree_util.tree_leaves((state.rel_params, state.rel_opt)):
        shards = [np.asarray(s.data) for s in leaf.addressable_shards]
        spread = max(spread, max(float(np.max(np.abs(x - shards[0]))) for x in shards))
    replica_spread[variant] = spread
    got_rel_acc = [np.asarray(x) for x in jax.tree_util.tree_leaves(state.rel_opt)
                   if np.shape(x) == params.shape]
    got = {"home": np.asarray(state.home.table).reshape(G, R, D),
           "home_acc": np.asarray(state.home.acc).reshape(G, R),
           "params": np.asarray(state.rel_params), "rel_acc": got_rel_acc[0]}
    want = {"home": ref[0], "home_acc": ref[1], "params": ref[4], "rel_acc": ref[5]}
    start = {"home": home, "home_acc": home_acc, "params": params,
             "rel_acc": np.zeros_like(params)}
    if not local:
      got["visiting"] = np.asarray(state.visiting.table).reshape(G, R, D)
      got["visiting_acc"] = np.asarray(state.visiting.acc).reshape(G, R)
      want["visiting"], want["visiting_acc"] = ref[2], ref[3]
      start["visiting"], start["visiting_acc"] = visiting, visiting_acc
    out[f"step_{variant}"] = {
        name: {"max_error": float(np.max(np.abs(got[name] - want[name]))),
               "max_change": float(np.max(np.abs(want[name] - start[name])))}
        for name in got}
  out["replicas"] = replica_spread
  return out


# --------------------------------------------------------------------------
# A whole bucket through the trainer, target-only type.


def bipartite_config(workdir: str, follows: bool = False):
  """users -> items under two relations; items are never sources. With
  ``follows`` also users -> users (a type that is source and target)."""
  rng = np.random.default_rng(1)
  path = os.path.join(workdir, "edges.tsv")
  with open(path, "w") as f:
    for _ in range(1500):
      user, item = int(rng.integers(200)), int(min(rng.zipf(1.5), 300) - 1)
      if follows and rng.uniform() < 0.5:
        f.write(f"u{user}\tfollows\tu{int(min(rng.zipf(1.5), 200) - 1)}\n")
        continue
      f.write(f"u{user}\t{'clicks' if rng.uniform() < 0.6 else 'likes'}\ti{item}\n")
  c = config_lib.base_config()
  c.name = "bipartite"
  c.entities = {"user": dict(num_partitions=1, dim=0), "item": dict(num_partitions=1, dim=0)}
  c.relations = [dict(name=r, source="user", target="item", operator="translation", weight=1.0)
                 for r in ("clicks", "likes")]
  if follows:
    c.relations.append(dict(name="follows", source="user", target="user",
                            operator="translation", weight=1.0))
  c.data.files = [config_lib.file_spec(path)]
  c.model.dim = 16
  c.model.init_scale = 0.1
  c.train.epochs = 1
  c.train.batch_size = 40
  c.train.eval_every_epochs = 0
  c.train.relation_lr = 0.05
  c.negatives.chunk_size = 10
  c.negatives.num_uniform = 0  # the only randomness left is the seeded shuffle
  c.mesh.num_devices = G
  return c


def target_only_check() -> dict:
  workdir = tempfile.mkdtemp()
  config = bipartite_config(workdir)
  trainer = train_lib.Trainer(config, os.path.join(workdir, "run"), progress=False)
  bucket = (0, 0)
  trainer.residency.load(bucket)
  (dim,) = trainer.residency.home
  # [G * capacity, d]: shard g is rows g * capacity ... (g + 1) * capacity - 1.
  table0 = np.asarray(trainer.residency.home[dim].table)
  acc0 = np.asarray(trainer.residency.home[dim].acc)
  rel0 = trainer.rel_state
  capacity = trainer.residency.capacity[dim]
  working = trainer.residency.layout
  calls = list(batching.prepare_bucket(trainer.graph, trainer.layout, working, bucket, config,
                                       (config.train.seed, 0, 0)))
  _, edges = train_lib.bucket_totals(*trainer.train_bucket(0, 0, calls))
  got_table = np.asarray(trainer.residency.home[dim].table)
  got_acc = np.asarray(trainer.residency.home[dim].acc)
  got_rel = trainer.rel_state
  spread = 0.0
  for leaf in jax.tree_util.tree_leaves(trainer._rel_state):
    shards = [np.asarray(s.data) for s in leaf.addressable_shards]
    spread = max(spread, max(float(np.max(np.abs(x - shards[0]))) for x in shards))
  trainer.close()

  # Replay: every call as one single-device call over the concatenated shards,
  # device g's chunks side by side; targets of round k sit in shard (g + k) mod G.
  table, acc = jnp.asarray(table0), jnp.asarray(acc0)
  params = {k: jnp.asarray(v) for k, v in rel0["params"].items()}
  opt = {k: jax.tree_util.tree_map(jnp.asarray, v) for k, v in rel0["opt"].items()}
  rounds = set()
  for k, call in calls:
    rounds.add(k)
    b = call.batch
    src_base = (np.arange(G) * capacity)[:, None, None, None]
    dst_base = (((np.arange(G) + k) % G) * capacity)[:, None, None, None]
    merge = lambda x: np.concatenate(list(x), axis=1)  # [G, T, S, ...] -> [T, G*S, ...]
    single = step_lib.StepBatch(
        src=merge(b.src + src_base), dst=merge(b.dst + dst_base), rel=merge(b.rel),
        weight=merge(b.weight), src_lo=merge(b.src_lo + src_base[..., 0]), src_n=merge(b.src_n),
        dst_lo=merge(b.dst_lo + dst_base[..., 0]), dst_n=merge(b.dst_n),
        step_index=np.arange(batching.STEPS_PER_CALL, dtype=np.int32),
        rel_reverse=None if b.rel_reverse is None else merge(b.rel_reverse))
    fn = step_lib.make_train_steps(
        "translation", config.model.comparator, config.train.loss, float(config.train.margin),
        float(config.train.lr), float(config.train.relation_lr), 0, bool(config.model.reciprocal),
        float(config.model.regularization))
    state = state_lib.StepState(state_lib.Rows(table, acc), None, params[call.group],
                                opt[call.group])
    state, _, _ = fn(state, single, jax.random.key(0))
    table, acc = state.home.table, state.home.acc
    params[call.group], opt[call.group] = state.rel_params, state.rel_opt
  ref_table, ref_acc = np.asarray(table), np.asarray(acc)
  result = {"edges": int(edges), "rounds": sorted(rounds), "replica_spread": spread,
            "table": {"max_error": float(np.max(np.abs(got_table - ref_table))),
                      "max_change": float(np.max(np.abs(ref_table - table0)))},
            "acc": {"max_error": float(np.max(np.abs(got_acc - ref_acc))),
                    "max_change": float(np.max(np.abs(ref_acc - acc0)))}}
  for group in params:
    want = np.asarray(params[group])
    result[f"params {group}"] = {
        "max_error": float(np.max(np.abs(got_rel["params"][group] - want))),
        "max_change": float(np.max(np.abs(want - rel0["params"][group])))}
  return result


def tournament_check() -> dict:
  """The tournament schedule on a graph where users are sources and targets:
  a bucket on G devices against the same calls replayed by the single-device
  step, every device's shard rows mapped back to their home rows."""
  workdir = tempfile.mkdtemp()
  config = bipartite_config(workdir, follows=True)
  config.mesh.schedule = "tournament"
  # Three passes through the rounds: the slots cycle home and out again
  # between passes (sharding.Tournament), and the replay must still match.
  config.mesh.round_passes = 3
  # One Adagrad accumulator per coordinate here (the ring check above keeps
  # one per row): [rows, d] accumulators travel with the slots.
  config.train.entity_accumulators = "coordinate"
  trainer = train_lib.Trainer(config, os.path.join(workdir, "run"), progress=False)
  bucket = (0, 0)
  trainer.residency.load(bucket)
  (dim,) = trainer.residency.home
  home = trainer.residency.home[dim]
  table0, acc0 = np.asarray(home.table), np.asarray(home.acc)
  rel0 = trainer.rel_state
  capacity, working = trainer.residency.capacity[dim], trainer.residency.layout
  calls = list(batching.prepare_bucket(trainer.graph, trainer.layout, working, bucket, config,
                                       (config.train.seed, 0, 0)))
  _, edges = train_lib.bucket_totals(*trainer.train_bucket(0, 0, calls))
  home = trainer.residency.home[dim]
  got_table, got_acc = np.asarray(home.table), np.asarray(home.acc)
  got_rel = trainer.rel_state
  trainer.close()

  plan = device_schedule.tournament(G)
  home_row = {}  # (round, device) -> [capacity] global row of each shard row
  for k in range(plan.num_rounds):
    for g in range(G):
      rows = g * capacity + np.arange(capacity)
      for block in working.blocks[dim]:
        half, start = working.sub_rows[block] // 2, working.offsets[block]
        for position, slot in enumerate(plan.holds[k][g]):
          at = start + position * half
          rows[at:at + half] = (slot // 2) * capacity + start + (slot % 2) * half + np.arange(half)
      home_row[k, g] = rows
  table, acc = jnp.asarray(table0), jnp.asarray(acc0)
  params = {k: jnp.asarray(v) for k, v in rel0["params"].items()}
  opt = {k: jax.tree_util.tree_map(jnp.asarray, v) for k, v in rel0["opt"].items()}
  rounds = set()
  for visit, call in calls:
    k = visit % plan.num_rounds  # visits cycle through the rounds (round_passes)
    rounds.add(k)
    b = call.batch
    to_home = lambda x: np.stack([home_row[k, g][x[g]] for g in range(G)])
    merge = lambda x: np.concatenate(list(x), axis=1)  # [G, T, S, ...] -> [T, G*S, ...]
    single = step_lib.StepBatch(
        src=merge(to_home(b.src)), dst=merge(to_home(b.dst)), rel=merge(b.rel),
        weight=merge(b.weight), src_lo=merge(to_home(b.src_lo)), src_n=merge(b.src_n),
        dst_lo=merge(to_home(b.dst_lo)), dst_n=merge(b.dst_n),
        step_index=np.arange(b.weight.shape[1], dtype=np.int32),
        rel_reverse=None if b.rel_reverse is None else merge(b.rel_reverse))
    fn = step_lib.make_train_steps(
        "translation", config.model.comparator, config.train.loss, float(config.train.margin),
        float(config.train.lr), float(config.train.relation_lr), 0, bool(config.model.reciprocal),
        float(config.model.regularization))
    state = state_lib.StepState(state_lib.Rows(table, acc), None, params[call.group],
                                opt[call.group])
    state, _, _ = fn(state, single, jax.random.key(0))
    table, acc = state.home.table, state.home.acc
    params[call.group], opt[call.group] = state.rel_params, state.rel_opt
  ref_table, ref_acc = np.asarray(table), np.asarray(acc)
  result = {"edges": int(edges), "rounds": sorted(rounds),
            "visits": sorted({visit for visit, _ in calls}), "acc_shape": list(got_acc.shape),
            "table": {"max_error": float(np.max(np.abs(got_table - ref_table))),
                      "max_change": float(np.max(np.abs(ref_table - table0)))},
            "acc": {"max_error": float(np.max(np.abs(got_acc - ref_acc))),
                    "max_change": float(np.max(np.abs(ref_acc - acc0)))}}
  for group in params:
    want = np.asarray(params[group])
    result[f"params {group}"] = {
        "max_error": float(np.max(np.abs(got_rel["params"][group] - want))),
        "max_change": float(np.max(np.abs(want - rel0["params"][group])))}
  return result


def main():
  if jax.device_count() < G:
    sys.exit(f"needs {G} devices, jax sees {jax.device_count()}")
  mesh = sharding_lib.make_mesh(G)
  result = step_checks(mesh)
  result["target_only"] = target_only_check()
  result["tournament"] = tournament_check()
  print(json.dumps(result))


if __name__ == "__main__":
  main()
