"""tools/bench_vs_pbg.py: PBG's input layout, and the exactness of ranking
PBG's model with our evaluation (no PBG needed for the latter)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess

import numpy as np
import pytest

from twhin_jax import config as config_lib
from twhin_jax import train as train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "bench_vs_pbg.py")
PBG_PYTHON = os.path.join(REPO, ".bench", "pbg-venv", "bin", "python")

_spec = importlib.util.spec_from_file_location("bench_vs_pbg", TOOL)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

NUM_ENTITIES = 30
RELATIONS = ["r0", "r1", "r2"]


def tiny_graph(tmp_path, reciprocal: bool, partitions: int = 2):
  """A random 3-relation KG imported into tmp_path/run (config.json written)."""
  rng = np.random.default_rng(0)
  files = []
  for split, n in (("train", 300), ("valid", 20), ("test", 25)):
    path = tmp_path / f"{split}.txt"
    rows = {(f"e{rng.integers(NUM_ENTITIES)}", RELATIONS[rng.integers(3)],
             f"e{rng.integers(NUM_ENTITIES)}") for _ in range(n)}
    path.write_text("".join("\t".join(row) + "\n" for row in sorted(rows)))
    files.append(config_lib.file_spec(str(path), split=split, format="tsv"))
  config = config_lib.base_config()
  config.entities.entity = dict(num_partitions=partitions, dim=0)
  config.relations = [dict(name=r, source="entity", target="entity", operator="translation",
                           weight=1.0) for r in RELATIONS]
  config.data.files = files
  config.model.dim = 8
  config.model.reciprocal = reciprocal
  config.eval.batch_size = 16
  workdir = tmp_path / "run"
  graph = train_lib.prepare_graph(config, str(workdir), progress=False)
  with open(workdir / train_lib.CONFIG_FILE, "w") as f:
    json.dump(config_lib.to_json_dict(config), f)
  return graph, str(workdir)


def brute_force_mrr(graph, emb, score_tail, score_head):
  """Filtered MRR (head + tail, ties averaged) of explicit score functions."""
  known = set()
  for split in ("train", "valid", "test"):
    e = graph.split_edges(split)
    known.update(zip(e["src"].tolist(), e["rel"].tolist(), e["dst"].tolist()))
  test = graph.split_edges("test")
  reciprocal_ranks = []
  for s, r, t in zip(test["src"].tolist(), test["rel"].tolist(), test["dst"].tolist()):
    for scores, answer, is_known in (
        (score_tail(s, r), t, lambda c: (s, r, c) in known),
        (score_head(t, r), s, lambda c: (c, r, t) in known)):
      keep = np.array([c == answer or not is_known(c) for c in range(len(emb))])
      others = np.delete(scores[keep], np.flatnonzero(np.flatnonzero(keep) == answer))
      rank = 1 + np.sum(others > scores[answer]) + 0.5 * np.sum(others == scores[answer])
      reciprocal_ranks.append(1.0 / rank)
  return float(np.mean(reciprocal_ranks))


def fake_pbg_export(tmp_path, graph, reciprocal: bool):
  """PBG-like outputs in a shuffled entity and relation order (as PBG's own
  importer would produce): the adapter must map them back by name."""
  rng = np.random.default_rng(1)
  names = graph.names("entity")
  emb = rng.normal(size=(len(names), 8)).astype(np.float32)  # by our id
  order = rng.permutation(len(names))
  export = tmp_path / "export"
  export.mkdir()
  np.save(export / "embeddings_entity.npy", emb[order])
  (export / "names_entity.json").write_text(json.dumps([names[i] for i in order]))
  pbg_rel_order = [2, 0, 1]
  (export / "relations.json").write_text(json.dumps([RELATIONS[k] for k in pbg_rel_order]))
  ours_rel = {graph.relation_index[name]: k for k, name in enumerate(RELATIONS)}
  fwd = rng.normal(size=(3, 8)).astype(np.float32)  # by name index
  rev = rng.normal(size=(3, 8)).astype(np.float32)
  if reciprocal:
    np.save(export / "forward.npy", fwd[pbg_rel_order])
    np.save(export / "reverse.npy", rev[pbg_rel_order])
  else:
    np.save(export / "rhs.npy", fwd[pbg_rel_order])
  by_rel = lambda table, r: table[ours_rel[r]]  # noqa: E731 - our relation index -> param
  return str(export), emb, lambda r: by_rel(fwd, r), lambda r: by_rel(rev, r)


@pytest.mark.parametrize("reciprocal", [False, True])
def test_our_ranking_of_pbg_scores_is_exact(tmp_path, reciprocal):
  """PBG single: f = s . (t + t_r); PBG dynamic: tail (s + g_r) . t', head s' . (t + h_r)."""
  graph, workdir = tiny_graph(tmp_path, reciprocal)
  export, emb, fwd, rev = fake_pbg_export(tmp_path, graph, reciprocal)
  metrics = bench.evaluate_pbg(workdir, export, "reciprocal" if reciprocal else "single",
                               progress=False)
  if reciprocal:
    expected = brute_force_mrr(graph, emb, lambda s, r: emb @ (emb[s] + fwd(r)),
                               lambda t, r: emb @ (emb[t] + rev(r)))
  else:
    expected = brute_force_mrr(graph, emb, lambda s, r: (emb + fwd(r)) @ emb[s],
                               lambda t, r: emb @ (emb[t] + fwd(r)))
  assert metrics["mrr"] == pytest.approx(expected, rel=1e-5)
  assert metrics["missing_entities"] == {"entity": 0}


@pytest.mark.skipif(not os.path.exists(PBG_PYTHON),
                    reason="PBG venv missing: run tools/bench_vs_pbg.py --quick once "
                           "(it creates .bench/pbg-venv with torchbiggraph and h5py)")
def test_pbg_layout_reads_back_with_pbg_storage(tmp_path):
  """The bucket writer's output, read by PBG's own storage classes."""
  graph, workdir = tiny_graph(tmp_path, reciprocal=False, partitions=2)
  out = tmp_path / "pbg-data"
  settings = json.dumps({"relations": "single"})
  bench.write_names_for_pbg(graph.path, str(out))
  subprocess.run([PBG_PYTHON, TOOL, "--phase", "pbg-write", "--settings", settings,
                  "--graph-dir", graph.path, "--pbg-data", str(out)],
                 check=True, capture_output=True, timeout=60)
  check = """
import json, sys
from torchbiggraph.graph_storages import FileEdgeStorage, FileEntityStorage
out = sys.argv[1]
entities, edges = FileEntityStorage(out), FileEdgeStorage(out + "/train")
result = {"counts": [entities.load_count("entity", p) for p in range(2)],
          "names": [entities.load_names("entity", p) for p in range(2)], "buckets": {}}
for i in range(2):
  for j in range(2):
    e = edges.load_chunk_of_edges(i, j)
    result["buckets"][f"{i}_{j}"] = [e.lhs.tensor.tolist(), e.rhs.tensor.tolist(), e.rel.tolist()]
print(json.dumps(result))
"""
  read = subprocess.run([PBG_PYTHON, "-W", "ignore", "-c", check, str(out)], check=True,
                        capture_output=True, text=True, timeout=120)
  result = json.loads(read.stdout.strip().splitlines()[-1])
  info = graph.entities["entity"]
  assert result["counts"] == [info.partition_rows(0), info.partition_rows(1)]
  assert sum(result["names"], []) == graph.names("entity")
  for (i, j), n in graph.bucket_sizes().items():
    ours = graph.bucket_edges(i, j)
    lhs, rhs, rel = result["buckets"][f"{i}_{j}"]
    assert lhs == ours["src"].tolist() and rhs == ours["dst"].tolist()
    assert rel == ours["rel"].tolist() and len(rel) == n


def test_parse_partitions():
  assert bench.parse_partitions("1,4") == [1, 4]
  assert bench.parse_partitions("16") == [16]
  for bad in ("", "0", "a", "1,-2", "1.5"):
    with pytest.raises(ValueError):
      bench.parse_partitions(bad)


def _read_ids(path):
  rows = [line.split("\t") for line in open(path).read().splitlines()]
  src = np.array([int(s[1:]) for s, _, _ in rows])
  dst = np.array([int(t[1:]) for _, _, t in rows])
  return src, dst


@pytest.mark.parametrize("affinity", [0.0, 0.7])
def test_power_law_communities(tmp_path, affinity):
  """The benchmark graph's planted structure: eq. (3) of generate.py."""
  from twhin_jax import generate
  nodes, edges, k = 3000, 60_000, 10
  kwargs = dict(num_nodes=nodes, num_edges=edges, num_communities=k,
                community_affinity=affinity, progress=False)
  one = generate.power_law_communities(str(tmp_path / "a.tsv"), chunk_edges=7000, **kwargs)
  generate.power_law_communities(str(tmp_path / "b.tsv"), chunk_edges=edges, **kwargs)
  # Seeded, and the bytes do not depend on the chunking.
  assert (tmp_path / "a.tsv").read_bytes() == (tmp_path / "b.tsv").read_bytes()
  src, dst = _read_ids(tmp_path / "a.tsv")
  assert len(src) == edges and src.min() >= 0 and max(src.max(), dst.max()) < nodes
  share = np.mean(src % k == dst % k)
  assert share == pytest.approx(one.summary["same_community_share"])
  assert share == pytest.approx(affinity + (1 - affinity) / k, abs=0.01)
  # Power-law targets: the top 1% of nodes take far more than 1% of the edges.
  degree = np.sort(np.bincount(dst, minlength=nodes))[::-1]
  assert degree[:nodes // 100].sum() / edges > 0.08


def test_bench_settings_per_partition_count():
  import argparse
  args = argparse.Namespace(quick=True, nodes=0, edges=0, dim=0, epochs=0, relations="auto",
                            lr=0.1, workers=2, devices=1)
  settings = [bench.settings_for(args, "powerlaw10m", p) for p in (1, 4)]
  assert [s["partitions"] for s in settings] == [1, 4]
  assert settings[0]["communities"] == 20 and settings[0]["community_affinity"] == 0.8
  config = bench.our_config(settings[1], "graph.tsv")
  assert config.entities.node.num_partitions == 4
  assert config.mesh.num_devices == 0 and bench.our_environment(settings[1]) == {}


def test_bench_devices_run_ours_on_that_many_cpu_devices_with_the_tournament(monkeypatch):
  """--devices G: our train and eval phases see G CPU devices (XLA's host
  platform flag, added to any flags the user set) and train with the
  tournament, which keeps a row on one device at a time."""
  import argparse
  args = argparse.Namespace(quick=True, nodes=0, edges=0, dim=0, epochs=0, relations="auto",
                            lr=0.1, workers=2, devices=2)
  settings = bench.settings_for(args, "powerlaw10m", 1)
  config = bench.our_config(settings, "graph.tsv")
  assert (config.mesh.num_devices, config.mesh.schedule) == (2, "tournament")
  config_lib.validate(config)
  monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
  env = bench.our_environment(settings)
  assert env["XLA_FLAGS"].split() == ["--xla_dump_to=/tmp/x",
                                      "--xla_force_host_platform_device_count=2"]
  assert env["JAX_PLATFORMS"] == "cpu"


def test_our_train_phase_compiles_from_an_empty_cache(tmp_path):
  """The timed train call must include compilation: the phase gets its own
  cache directory, emptied before every run, under the name twhin_jax reads."""
  stale = tmp_path / "ours-compilation-cache" / "jit_step-abc"
  stale.parent.mkdir()
  stale.write_text("a program compiled by an earlier run")
  env = bench.fresh_compilation_cache(str(tmp_path))
  assert list(env) == [train_lib.COMPILATION_CACHE_ENV]
  cache = env[train_lib.COMPILATION_CACHE_ENV]
  assert cache.startswith(str(tmp_path))
  assert not os.path.exists(cache) or not os.listdir(cache)
