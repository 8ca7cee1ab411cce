"""Product quantization: exact on few distinct values, recall falls with the factor."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from twhin_jax import cli
from twhin_jax import compress
from twhin_jax import embedding_set
from twhin_jax import vocabulary
from twhin_jax.graph import Graph


def clustered(n=600, dim=16, clusters=30, seed=0):
  rng = np.random.default_rng(seed)
  centres = rng.standard_normal((clusters, dim))
  return (centres[rng.integers(clusters, size=n)] + 0.3 * rng.standard_normal((n, dim))).astype(
      np.float32)


def test_one_dim_subspaces_reproduce_few_distinct_values_exactly():
  rng = np.random.default_rng(0)
  # 200 distinct rows whose every column holds at most 200 distinct values (<= 256 centroids).
  x = np.stack([rng.permutation(200) for _ in range(8)], axis=1).astype(np.float32) * 0.37
  codebook, codes = compress.train_pq(x, num_subspaces=8)  # M = d: one dimension per subspace
  assert codes.dtype == np.uint8 and codes.shape == (200, 8)
  np.testing.assert_array_equal(compress.decode(codes, codebook), x)


def test_padding_when_m_does_not_divide_d():
  x = clustered(n=300, dim=10)
  codebook, codes = compress.train_pq(x, num_subspaces=4)  # 10 -> 12 = 4 x 3
  assert codebook.centroids.shape == (4, 256, 3) and codebook.dim == 10
  decoded = compress.decode(codes, codebook)
  assert decoded.shape == (300, 10)
  assert np.mean(np.square(decoded - x)) < 0.5 * np.mean(np.square(x - x.mean(0)))
  np.testing.assert_array_equal(compress.encode(x, codebook), codes)


def test_factor_to_subspaces():
  assert [compress.subspaces_for_factor(128, f) for f in (4, 8, 16, 32, 64)] == [128, 64, 32, 16, 8]
  assert compress.compression_factor(128, 32) == 16.0
  assert compress.subspaces_for_factor(200, 64) == 12  # 12.5 rounds to even


def test_recall_falls_as_the_factor_rises():
  x = clustered()
  recalls = []
  for factor in (4, 16, 64):
    codebook, codes = compress.train_pq(x, compress.subspaces_for_factor(16, factor))
    recalls.append(compress.recall_at_k(x, compress.decode(codes, codebook), k=10))
  assert recalls[0] > 0.9, recalls
  assert recalls[0] > recalls[1] > recalls[2], recalls
  assert recalls[2] < recalls[0] - 0.2, recalls


def test_pq_embed_decodes_inside_a_module():
  x = clustered(n=300)
  codebook, codes = compress.train_pq(x, num_subspaces=4)
  embed = compress.PQEmbed(codes, codebook)
  ids = jnp.array([[0, 5], [299, 17]])
  out = np.asarray(embed(ids))  # [2, 2, 16]
  np.testing.assert_allclose(out, compress.decode(codes, codebook)[np.asarray(ids)], rtol=1e-6)


@pytest.fixture(scope="module")
def run_dir(demo_run_d16):
  return demo_run_d16


def test_compress_run_writes_codes_and_reports_recall(run_dir, monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("a whole vocabulary was loaded into memory")
  monkeypatch.setattr(Graph, "names", refuse)  # names go from vocab/ to vocab/ as files
  lines = compress.compress_run(run_dir, (4, 64), types=["user", "ad"])
  assert [r["factor"] for r in lines] == [4, 64]
  assert json.load(open(os.path.join(lines[0]["path"], "summary.json")))["factor"] == 4
  assert lines[0]["recall_at_10"] > lines[1]["recall_at_10"]
  folder = os.path.join(run_dir, "compressed", "factor_4")
  names, codes, codebook = embedding_set.load_pq(os.path.join(folder, "user.npz"))
  assert codes.shape == (600, 16) and codes.dtype == np.uint8 and len(names) == 600
  graph_vocabulary = vocabulary.Vocabulary(os.path.join(run_dir, "graph"), "user")
  assert names[:50] == graph_vocabulary.names(np.arange(50))
  assert os.path.exists(os.path.join(run_dir, "compressed", "recall.png"))
  # A compressed folder is an embedding source: decoded rows plus codes for PQEmbed.
  loaded = embedding_set.load_embeddings(folder)
  assert set(loaded.pq) == {"user", "ad"}
  original = embedding_set.load_embeddings(run_dir, ["user"]).tables["user"]
  error = np.mean(np.square(loaded.tables["user"] - original)) / np.mean(np.square(original))
  assert error < 0.05


def test_compress_cli_prints_one_json_object_per_factor(run_dir, capsys, tmp_path):
  assert cli.main(["compress", "--workdir", run_dir, "--factors", "16", "--json"]) == 0
  (line,) = capsys.readouterr().out.strip().splitlines()
  result = json.loads(line)
  assert result["factor"] == 16 and 0.0 <= result["recall_at_10"] <= 1.0
  assert cli.main(["compress", "--workdir", str(tmp_path / "missing")]) == 2
  assert "missing: no such run" in capsys.readouterr().err
