"""Evaluation: jitted filtered ranks against a brute-force numpy loop."""

from __future__ import annotations

import json
import math
import os

import ml_collections
import numpy as np
import pytest

from twhin_jax import config as config_lib
from twhin_jax import evaluation
from twhin_jax import vocabulary
from twhin_jax.graph import FORMAT_VERSION, Graph
from twhin_jax.model import RelationLayout


# ---------------------------------------------------------------------------
# A tiny imported graph, written in the on-disk format of twhin_jax.graph.


def write_graph(root, entities: dict[str, int], relations: list[tuple[str, str, str, str]],
                splits: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> Graph:
  """Writes an unpartitioned graph (P = 1): entities {type: count},
  relations [(name, source, target, operator)], splits {split: (src, rel, dst)}."""
  root = str(root)
  train = splits.get("train", (np.zeros(0),) * 3)
  manifest = {
      "format_version": FORMAT_VERSION,
      "hash": "test",
      "schema": {
          "entities": {t: {"count": n, "num_partitions": 1} for t, n in entities.items()},
          "relations": [dict(name=n, source=s, target=t, operator=o, weight=1.0)
                        for n, s, t, o in relations],
      },
      "counts": {s: int(len(splits.get(s, ((),))[0])) for s in config_lib.SPLITS},
      "bucket_sizes": {"0_0": int(len(train[0]))},
      "weighted": False,
  }
  for sub in ("vocab", "degrees", "buckets/0_0", "splits/valid", "splits/test"):
    os.makedirs(os.path.join(root, sub), exist_ok=True)
  with open(os.path.join(root, "manifest.json"), "w") as f:
    json.dump(manifest, f)
  degrees = {t: np.zeros(n, np.int64) for t, n in entities.items()}
  src, rel, dst = (np.asarray(x, np.int64) for x in train)
  for r, (_, source, target, _) in enumerate(relations):
    np.add.at(degrees[source], src[rel == r], 1)
    np.add.at(degrees[target], dst[rel == r], 1)
  for t, n in entities.items():
    vocabulary.write_vocabulary(root, t, [f"{t}_{i}" for i in range(n)])
    np.save(os.path.join(root, "degrees", f"{t}.npy"), degrees[t])
  for key, x in zip(("src", "rel", "dst"), (src, rel, dst)):
    np.save(os.path.join(root, "buckets", "0_0", f"{key}.npy"), x.astype(np.int32))
  for split in ("valid", "test"):
    if split in splits:
      for key, x in zip(("src", "rel", "dst"), splits[split]):
        np.save(os.path.join(root, "splits", split, f"{key}.npy"), np.asarray(x, np.int64))
  return Graph(root)


def make_config(entities: dict[str, int], relations, *, dim: int, comparator: str = "dot",
                batch_size: int = 4, filtered: bool = True, num_sampled: int = 0):
  config = config_lib.base_config()
  for t in entities:
    config.entities[t] = ml_collections.ConfigDict(dict(num_partitions=1, dim=0))
  config.relations = [dict(name=n, source=s, target=t, operator=o, weight=1.0)
                      for n, s, t, o in relations]
  config.model.dim = dim
  config.model.comparator = comparator
  config.eval.batch_size = batch_size
  config.eval.filtered = filtered
  config.eval.num_sampled_negatives = num_sampled
  return config


def random_edges(rng, relations, entities, n):
  rel = rng.integers(0, len(relations), n)
  src = np.array([rng.integers(entities[relations[r][1]]) for r in rel])
  dst = np.array([rng.integers(entities[relations[r][2]]) for r in rel])
  return src, rel, dst


# ---------------------------------------------------------------------------
# The brute-force reference: one query at a time, candidates transformed.


def np_operator(operator, p, x):
  if operator == "none":
    return x
  if operator == "translation":
    return x + p
  if operator == "diagonal":
    return x * p
  if operator == "complex_diagonal":
    h = x.shape[-1] // 2
    a, b, c, e = x[..., :h], x[..., h:], p[:h], p[h:]
    return np.concatenate([a * c - b * e, a * e + b * c], axis=-1)
  if operator == "linear":
    return x @ p.T
  raise ValueError(operator)


def np_compare(comparator, u, v):
  """u [..., d] against v [..., d] -> [...] in float64."""
  u, v = u.astype(np.float64), v.astype(np.float64)
  if comparator == "dot":
    return np.sum(u * v, -1)
  if comparator == "cos":
    return np.sum(u * v, -1) / (np.linalg.norm(u, axis=-1) * np.linalg.norm(v, axis=-1) + 1e-9)
  return -np.sum((u - v) ** 2, -1)


def reference_ranks(graph, emb, params, layout, comparator, split, filtered):
  known = set()
  for s in config_lib.SPLITS:
    e = graph.split_edges(s)
    known.update(zip(e["src"].tolist(), e["rel"].tolist(), e["dst"].tolist()))
  e = graph.split_edges(split)
  out = {k: [] for k in ("head_rank", "tail_rank", "head_auc", "tail_auc",
                         "head_negatives", "tail_negatives")}
  for s, r, t in zip(e["src"].tolist(), e["rel"].tolist(), e["dst"].tolist()):
    info, op = graph.relations[r], layout.operators[r]
    p = np.asarray(layout.param(params, r))
    for side in ("tail", "head"):
      if side == "tail":
        n = graph.entities[info.target].count
        scores = np_compare(comparator, np_operator(op, p, emb[info.source][s])[None],
                            emb[info.target])
        true, bad = t, [c for c in range(n) if (s, r, c) in known]
      else:
        n = graph.entities[info.source].count
        scores = np_compare(comparator, np_operator(op, p, emb[info.source]),
                            emb[info.target][t][None])
        true, bad = s, [c for c in range(n) if (c, r, t) in known]
      negatives = [c for c in range(n) if c != true and not (filtered and c in bad)]
      greater = sum(scores[c] > scores[true] for c in negatives)
      equal = sum(scores[c] == scores[true] for c in negatives)
      out[f"{side}_rank"].append(1 + greater + 0.5 * equal)
      out[f"{side}_auc"].append((len(negatives) - greater - 0.5 * equal) / len(negatives)
                                if negatives else 0.5)
      out[f"{side}_negatives"].append(len(negatives))
  return {k: np.array(v) for k, v in out.items()}


ENTITIES = {"user": 9, "item": 11}
RELATIONS = [
    ("follows", "user", "user", "translation"),
    ("likes", "user", "item", "translation"),  # same group, other types
    ("rates", "user", "item", "diagonal"),
    ("tags", "item", "item", "complex_diagonal"),
    ("links", "item", "user", "linear"),
    ("sees", "user", "item", "none"),
]


def planted_graph(tmp_path, seed=0):
  rng = np.random.default_rng(seed)
  splits = {}
  for split, n in (("train", 120), ("valid", 20), ("test", 40)):
    splits[split] = random_edges(rng, RELATIONS, ENTITIES, n)
  # A popular target: many known sources for (rates, item 0), so filters are long.
  splits["train"] = tuple(np.concatenate([a, b]) for a, b in zip(
      splits["train"], (np.arange(9), np.full(9, 2), np.zeros(9, int))))
  return write_graph(tmp_path, ENTITIES, RELATIONS, splits)


def random_model(layout, dim, integer, seed=1):
  """Integer-valued tables (exact float math, many ties) or Gaussian ones."""
  rng = np.random.default_rng(seed)
  draw = ((lambda shape: rng.integers(-1, 2, shape).astype(np.float32)) if integer
          else (lambda shape: rng.normal(size=shape).astype(np.float32)))
  emb = {t: draw((n, dim)) for t, n in ENTITIES.items()}
  params = {name: draw(p.shape) for name, p in layout.init_params().items()}
  return emb, params


@pytest.mark.parametrize("comparator", ["dot", "l2", "cos"])
@pytest.mark.parametrize("filtered", [True, False])
def test_ranks_match_brute_force(tmp_path, comparator, filtered):
  graph = planted_graph(tmp_path)
  config = make_config(ENTITIES, RELATIONS, dim=4, comparator=comparator,
                       batch_size=3, filtered=filtered)
  layout = RelationLayout.from_config(config)
  # Integer tables make float math exact, so ties are real ties on both
  # sides; cos normalises (inexact), so it gets untied Gaussian tables.
  emb, params = random_model(layout, 4, integer=comparator != "cos")
  got = evaluation.rank_triples(graph, emb, params, layout, config, "test", progress=False)
  want = reference_ranks(graph, emb, params, layout, comparator, "test", filtered)
  if comparator != "cos":
    assert np.any(want["tail_rank"] % 1 == 0.5)  # the data does have ties
  for key, value in want.items():
    np.testing.assert_allclose(getattr(got, key), value, rtol=0, atol=1e-12, err_msg=key)
  e = graph.split_edges("test")
  np.testing.assert_array_equal(got.src, e["src"])
  np.testing.assert_array_equal(got.rel, e["rel"])


def test_dense_filter_path_matches_brute_force(tmp_path, monkeypatch):
  """Long filters switch to a host-built dense mask; same ranks."""
  graph = planted_graph(tmp_path)
  config = make_config(ENTITIES, RELATIONS, dim=4, batch_size=64)
  layout = RelationLayout.from_config(config)
  emb, params = random_model(layout, 4, integer=True)
  calls = []
  original = evaluation._full_rank_counts

  def spy(*args, **kwargs):
    calls.append(kwargs["dense_filter"] is not None)
    return original(*args, **kwargs)
  monkeypatch.setattr(evaluation, "_full_rank_counts", spy)
  got = evaluation.rank_triples(graph, emb, params, layout, config, "train", progress=False)
  want = reference_ranks(graph, emb, params, layout, "dot", "train", True)
  assert any(calls)  # the popular (rates, item 0) batch is dense
  for key, value in want.items():
    np.testing.assert_allclose(getattr(got, key), value, rtol=0, atol=1e-12, err_msg=key)


def test_metrics_follow_their_formulas(tmp_path):
  graph = planted_graph(tmp_path)
  config = make_config(ENTITIES, RELATIONS, dim=4)
  layout = RelationLayout.from_config(config)
  emb, params = random_model(layout, 4, integer=True)
  result = evaluation.evaluate(graph, emb, params, layout, config, "test", progress=False)
  want = reference_ranks(graph, emb, params, layout, "dot", "test", True)
  rank = np.concatenate([want["head_rank"], want["tail_rank"]])
  auc = np.concatenate([want["head_auc"], want["tail_auc"]])
  assert result["count"] == 2 * 40
  assert result["mrr"] == pytest.approx(np.mean(1 / rank))
  assert result["mr"] == pytest.approx(np.mean(rank))
  for k in (1, 3, 10):
    assert result[f"hits@{k}"] == pytest.approx(np.mean(rank <= k))
  assert result["auc"] == pytest.approx(np.mean(auc))
  assert result["head"]["mrr"] == pytest.approx(np.mean(1 / want["head_rank"]))
  assert result["tail"]["mr"] == pytest.approx(np.mean(want["tail_rank"]))
  assert result["head"]["count"] == result["tail"]["count"] == 40
  # Per relation: exactly the relations of the split, 2 ranks per triple.
  rel = graph.split_edges("test")["rel"]
  assert set(result["per_relation"]) == {RELATIONS[r][0] for r in np.unique(rel)}
  for name, m in result["per_relation"].items():
    r = [x[0] for x in RELATIONS].index(name)
    assert m["count"] == 2 * int(np.sum(rel == r))
    members = np.concatenate([want["head_rank"][rel == r], want["tail_rank"][rel == r]])
    assert m["mrr"] == pytest.approx(np.mean(1 / members))
    assert set(m) == set(evaluation.METRIC_KEYS)
  assert set(evaluation.METRIC_KEYS) <= set(result)
  json.dumps(result, allow_nan=False)  # plain Python numbers only
  assert all(type(result[k]) is float for k in evaluation.METRIC_KEYS if k != "count")
  assert type(result["count"]) is int


# ---------------------------------------------------------------------------
# Planted and random embeddings.


def cluster_graph(tmp_path, clusters=3, size=4):
  """Every ordered pair inside a cluster is an edge (self-loops included)."""
  n = clusters * size
  pairs = [(i, j) for i in range(n) for j in range(n) if i // size == j // size]
  rng = np.random.default_rng(0)
  pairs = [pairs[i] for i in rng.permutation(len(pairs))]
  test = [p for p in pairs if p[0] != p[1]][:12]
  train = [p for p in pairs if p not in test]
  as_split = lambda ps: (np.array([p[0] for p in ps]), np.zeros(len(ps), int),
                         np.array([p[1] for p in ps]))
  entities = {"node": n}
  relations = [("same", "node", "node", "none")]
  graph = write_graph(tmp_path, entities, relations,
                      {"train": as_split(train), "test": as_split(test)})
  emb = {"node": np.eye(clusters, dtype=np.float32)[np.arange(n) // size]}  # one-hot cluster
  return graph, entities, relations, emb


@pytest.mark.parametrize("num_sampled", [0, 20])
def test_perfect_embeddings_give_mrr_one_only_when_filtered(tmp_path, num_sampled):
  graph, entities, relations, emb = cluster_graph(tmp_path)
  results = {}
  for filtered in (True, False):
    config = make_config(entities, relations, dim=3, filtered=filtered, num_sampled=num_sampled)
    layout = RelationLayout.from_config(config)
    results[filtered] = evaluation.evaluate(graph, emb, layout.init_params(), layout,
                                            config, "test", progress=False)
  assert results[True]["mrr"] == 1.0
  assert results[True]["mr"] == 1.0
  assert results[True]["hits@1"] == 1.0
  assert results[True]["auc"] == 1.0
  if num_sampled == 0:  # three cluster mates tie with the answer
    assert results[False]["mr"] == 2.5
    assert results[False]["mrr"] == pytest.approx(0.4)
    assert results[False]["hits@1"] == 0.0
    assert results[False]["hits@3"] == 1.0
    assert results[False]["auc"] == pytest.approx((11 - 1.5) / 11)
  else:
    assert results[False]["mrr"] < 1.0


def random_graph(tmp_path, n=400, triples=3000, dim=32):
  rng = np.random.default_rng(3)
  entities = {"node": n}
  relations = [("r0", "node", "node", "translation"), ("r1", "node", "node", "translation")]
  splits = {split: random_edges(rng, relations, entities, m)
            for split, m in (("train", 3000), ("test", triples))}
  graph = write_graph(tmp_path, entities, relations, splits)
  emb = {"node": rng.normal(size=(n, dim)).astype(np.float32)}
  return graph, entities, relations, emb


def test_random_embeddings_score_like_random(tmp_path):
  graph, entities, relations, emb = random_graph(tmp_path)
  n = entities["node"]
  config = make_config(entities, relations, dim=32, batch_size=256, filtered=False)
  layout = RelationLayout.from_config(config)
  params = {k: np.random.default_rng(4).normal(size=v.shape).astype(np.float32)
            for k, v in layout.init_params().items()}
  result = evaluation.evaluate(graph, emb, params, layout, config, "test", progress=False)
  # The true answer's rank is uniform on 1..n: E[1/rank] = H_n / n.
  harmonic = sum(1 / k for k in range(1, n + 1))
  assert result["mrr"] == pytest.approx(harmonic / n, abs=0.004)
  assert result["mr"] == pytest.approx((n + 1) / 2, abs=8)
  assert result["hits@10"] == pytest.approx(10 / n, abs=0.01)
  assert result["auc"] == pytest.approx(0.5, abs=0.02)


def test_sampled_ranking_sanity(tmp_path):
  graph, entities, relations, emb = random_graph(tmp_path)
  num_sampled = 50
  config = make_config(entities, relations, dim=32, batch_size=256, num_sampled=num_sampled)
  layout = RelationLayout.from_config(config)
  params = layout.init_params()
  ranks = evaluation.rank_triples(graph, emb, params, layout, config, "test", progress=False)
  for side in ("head", "tail"):
    rank, negatives = getattr(ranks, f"{side}_rank"), getattr(ranks, f"{side}_negatives")
    assert np.all(negatives <= 2 * num_sampled) and np.all(negatives >= num_sampled)
    assert np.all((rank >= 1) & (rank <= negatives + 1))
  result = evaluation.summarize(ranks, [r[0] for r in relations])
  k = 2 * num_sampled + 1  # about uniform on 1..2N+1
  assert result["mrr"] == pytest.approx(sum(1 / i for i in range(1, k + 1)) / k, abs=0.01)
  assert result["auc"] == pytest.approx(0.5, abs=0.03)
  again = evaluation.evaluate(graph, emb, params, layout, config, "test", progress=False)
  assert again == result  # seeded


def test_max_triples_subsample_is_seeded(tmp_path):
  graph, entities, relations, emb = random_graph(tmp_path, triples=500)
  config = make_config(entities, relations, dim=32, batch_size=64)
  config.eval.max_triples = 100
  layout = RelationLayout.from_config(config)
  params = layout.init_params()
  a = evaluation.rank_triples(graph, emb, params, layout, config, "test", progress=False)
  b = evaluation.rank_triples(graph, emb, params, layout, config, "test", progress=False)
  assert len(a.src) == 100
  np.testing.assert_array_equal(a.src, b.src)
  np.testing.assert_array_equal(a.tail_rank, b.tail_rank)
  full = graph.split_edges("test")
  triples = set(zip(full["src"].tolist(), full["rel"].tolist(), full["dst"].tolist()))
  assert set(zip(a.src.tolist(), a.rel.tolist(), a.dst.tolist())) <= triples
  c = evaluation.evaluate(graph, emb, params, layout, config, "test", progress=False,
                          max_triples=30)
  assert c["count"] == 60
  config.train.seed = 1
  d = evaluation.rank_triples(graph, emb, params, layout, config, "test", progress=False)
  assert not np.array_equal(a.src, d.src)


def test_empty_split_and_nan_scores(tmp_path):
  graph, entities, relations, emb = cluster_graph(tmp_path)
  config = make_config(entities, relations, dim=3)
  layout = RelationLayout.from_config(config)
  empty = evaluation.evaluate(graph, emb, layout.init_params(), layout, config, "valid",
                              progress=False)
  assert empty["count"] == 0 and math.isnan(empty["mrr"])
  bad = {"node": np.full_like(emb["node"], np.nan)}
  result = evaluation.evaluate(graph, bad, layout.init_params(), layout, config, "test",
                               progress=False)
  # Divergence never looks good: a NaN answer ranks below all of C (|C| = 12 - 4).
  assert result["mr"] == 9.0 and result["hits@1"] == 0.0 and result["auc"] == 0.0
  # A NaN candidate counts as beating the answer.
  one_bad = emb["node"].copy()
  one_bad[11] = np.nan  # cluster 2
  ranks = evaluation.rank_triples(graph, {"node": one_bad}, layout.init_params(), layout,
                                  config, "test", progress=False)
  clean = (ranks.src < 8) & (ranks.dst < 8)
  assert clean.any()
  np.testing.assert_array_equal(ranks.tail_rank[clean], 2.0)
  np.testing.assert_array_equal(ranks.head_rank[clean], 2.0)


def test_rejects_mismatched_tables(tmp_path):
  graph, entities, relations, emb = cluster_graph(tmp_path)
  config = make_config(entities, relations, dim=3)
  layout = RelationLayout.from_config(config)
  with pytest.raises(ValueError, match="rows"):
    evaluation.evaluate(graph, {"node": emb["node"][:-1]}, layout.init_params(), layout,
                        config, "test", progress=False)


def test_eval_reports_edges_with_entities_unseen_in_train(demo_run_d16):
  """`twhin eval` says how many edges of the split rank an entity that no train
  edge touched (counted independently here from degrees and the split)."""
  from twhin_jax import rundir
  run = rundir.open_run(demo_run_d16)
  metrics = evaluation.evaluate_run(run, "test", progress=False, max_triples=50)
  edges = run.graph.split_edges("test")
  unseen = 0
  for src, rel, dst in zip(edges["src"], edges["rel"], edges["dst"]):
    relation = run.graph.relations[int(rel)]
    if (run.graph.degrees(relation.source)[src] == 0
        or run.graph.degrees(relation.target)[dst] == 0):
      unseen += 1
  assert metrics["edges_with_unseen_entities"] == unseen


def test_eval_counts_an_unseen_test_entity(tmp_path):
  """A test edge to an entity with no train edge is counted by the import and
  reported by evaluate_run (1 here, not 0). evaluate_run (`twhin eval`) ranks
  the whole split: eval.max_triples subsamples only the per-epoch validation."""
  from test_import import make_config, write_text
  from twhin_jax import rundir
  from twhin_jax import train as train_lib
  train = write_text(tmp_path / "train.tsv", ["a\tlikes\tb", "b\tlikes\tc", "c\tknows\ta"])
  test = write_text(tmp_path / "test.tsv", ["a\tlikes\tnew", "b\tknows\tc"])
  config = make_config([config_lib.file_spec(train),
                        config_lib.file_spec(test, split="test")])
  config.model.dim = 4
  config.train.epochs = 1
  config.train.eval_every_epochs = 0
  config.negatives.chunk_size = 2
  config.negatives.num_uniform = 2
  config.train.batch_size = 2
  config.eval.max_triples = 1
  workdir = str(tmp_path / "run")
  train_lib.train(config, workdir, progress=False).close()
  metrics = evaluation.evaluate_run(rundir.open_run(workdir), "test", progress=False)
  assert metrics["edges_with_unseen_entities"] == 1
  assert metrics["count"] == 4  # both test triples, head and tail
