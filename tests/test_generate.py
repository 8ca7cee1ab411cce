"""Synthetic graph generators: determinism, counts, structure, streaming."""

import collections
import os
import re
import tracemalloc

import numpy as np
import pytest

from twhin_jax import config as config_lib
from twhin_jax import generate

SMALL = dict(num_users=2000, num_tweets=10_000, num_advertisers=50, num_ads=500,
             num_communities=10)
ENGAGEMENTS = ("follows", "favorites", "retweets", "replies", "clicks")
PATTERNS = {"user": r"u\d+", "tweet": r"t\d+", "advertiser": r"a\d+", "ad": r"ad\d+"}


def _read_pairs(path):
  with open(path) as f:
    return [line.rstrip("\n").split("\t") for line in f]


def _tsv_bytes(directory):
  return {name: open(os.path.join(directory, name), "rb").read()
          for name in sorted(os.listdir(directory)) if name.endswith(".tsv")}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("twitter_small"))
  specs = generate.twitter_like(out, **SMALL, seed=0)
  edges = {spec["relation_name"]: _read_pairs(spec["path"]) for spec in specs}
  communities = generate.read_communities(os.path.join(out, "communities.tsv"))
  return out, specs, edges, communities


def test_twitter_like_deterministic(small, tmp_path):
  out, _, _, _ = small
  generate.twitter_like(str(tmp_path / "same"), **SMALL, seed=0)
  generate.twitter_like(str(tmp_path / "other"), **SMALL, seed=1)
  first, same, other = _tsv_bytes(out), _tsv_bytes(tmp_path / "same"), _tsv_bytes(tmp_path / "other")
  assert len(first) == 8  # 7 relations + communities
  assert first == same
  for name in first:
    assert first[name] != other[name], name


def test_twitter_like_specs_and_counts(small):
  out, specs, edges, communities = small
  names = [rel for rel, _, _ in generate.TWITTER_RELATIONS]
  assert [s["relation_name"] for s in specs] == names
  for spec in specs:
    assert set(spec) == set(config_lib.FILE_SPEC_FIELDS)
    assert (spec["source"], spec["target"], spec["relation"]) == (0, 1, None)
    assert spec["split"] == "train" and not spec["header"] and os.path.isabs(spec["path"])
  summary = specs.summary
  want = {rel: round(generate.EDGES_PER_USER[rel] * SMALL["num_users"]) for rel in ENGAGEMENTS}
  want.update(authors=SMALL["num_tweets"], promotes=SMALL["num_ads"])
  assert summary["edge_counts"] == want
  assert {rel: len(e) for rel, e in edges.items()} == want
  assert summary["total_edges"] == sum(want.values())
  counts = {t: len(c) for t, c in communities.items()}
  assert counts == summary["entity_counts"] == dict(
      user=2000, tweet=10_000, advertiser=50, ad=500)
  assert os.path.exists(os.path.join(out, "twitter_like.json"))
  assert all(len(set(map(tuple, e))) == len(e) for e in edges.values())  # distinct pairs
  assert not any(s == d for s, d in edges["follows"])  # no self-loops


def test_twitter_like_num_edges_override(tmp_path):
  specs = generate.twitter_like(str(tmp_path), num_users=200, num_tweets=500,
                                num_advertisers=5, num_ads=20, num_communities=4,
                                num_edges=dict(favorites=1234, clicks=77),
                                edges_per_user=dict(follows=3))
  counts = specs.summary["edge_counts"]
  assert counts["favorites"] == 1234 and counts["clicks"] == 77 and counts["follows"] == 600
  with pytest.raises(ValueError, match="unknown"):
    generate.twitter_like(str(tmp_path), num_edges=dict(likes=3))


def test_twitter_like_structure(small):
  _, _, edges, communities = small
  # Every tweet has exactly one author, every ad one advertiser.
  tweets = collections.Counter(t for _, t in edges["authors"])
  assert len(tweets) == SMALL["num_tweets"] and set(tweets.values()) == {1}
  ads = collections.Counter(a for _, a in edges["promotes"])
  assert len(ads) == SMALL["num_ads"] and set(ads.values()) == {1}
  # Every advertiser promotes something; every user follows someone.
  assert len({a for a, _ in edges["promotes"]}) == SMALL["num_advertisers"]
  assert len({u for u, _ in edges["follows"]}) == SMALL["num_users"]
  # Tweets and ads take their author's / advertiser's community.
  assert all(communities["tweet"][t] == communities["user"][u] for u, t in edges["authors"])
  assert all(communities["ad"][a] == communities["advertiser"][v] for v, a in edges["promotes"])
  # Name prefixes by type.
  for rel, source, target in generate.TWITTER_RELATIONS:
    for s, t in edges[rel]:
      assert re.fullmatch(PATTERNS[source], s) and re.fullmatch(PATTERNS[target], t), (rel, s, t)
  for t, names in communities.items():
    assert all(re.fullmatch(PATTERNS[t], n) for n in names)
    assert set(names.values()) <= set(range(SMALL["num_communities"]))


def test_twitter_like_power_law(small):
  _, _, edges, _ = small
  top = SMALL["num_users"] // 100

  def top_share(names):
    counts = np.sort(np.array(list(collections.Counter(names).values())))[::-1]
    return counts[:top].sum() / counts.sum()

  engagements = [s for rel in ENGAGEMENTS for s, _ in edges[rel]]
  # Measured 0.15 (sources of all engagements), 0.16 (favorited tweets,
  # top 1% = 100 tweets); uniform would give ~0.01-0.02.
  assert top_share(engagements) > 0.10
  tweet_counts = np.sort(np.array(list(
      collections.Counter(t for _, t in edges["favorites"]).values())))[::-1]
  assert tweet_counts[:SMALL["num_tweets"] // 100].sum() / tweet_counts.sum() > 0.10
  # Tweets per author are skewed too (measured 0.26).
  assert top_share([u for u, _ in edges["authors"]]) > 0.15


@pytest.mark.parametrize("affinity", [0.8, 0.0])
def test_twitter_like_community_affinity(small, tmp_path, affinity):
  if affinity == 0.8:
    _, _, edges, communities = small
  else:
    out = str(tmp_path)
    specs = generate.twitter_like(out, **SMALL, community_affinity=affinity)
    edges = {s["relation_name"]: _read_pairs(s["path"]) for s in specs}
    communities = generate.read_communities(os.path.join(out, "communities.tsv"))
  # Same-community share = a + (1 - a) * (chance that a global draw lands in
  # the source's community) ~ a + (1 - a) / K.
  expected = affinity + (1 - affinity) / SMALL["num_communities"]
  for rel, _, target in generate.TWITTER_RELATIONS:
    if rel not in ENGAGEMENTS:
      continue
    same = np.mean([communities["user"][s] == communities[target][t] for s, t in edges[rel]])
    assert abs(same - expected) < 0.04, (rel, same, expected)


def test_twitter_like_schema_validates(small):
  _, specs, _, _ = small
  entities, relations = generate.twitter_like_schema(num_partitions=2, partitioned=("user", "tweet"))
  assert entities["user"] == dict(num_partitions=2, dim=0)
  assert entities["ad"]["num_partitions"] == 1
  assert {r["operator"] for r in relations} == {"translation"}
  c = config_lib.base_config()
  c.entities = entities
  c.relations = relations
  c.data.files = list(specs)
  config_lib.validate(c)


def test_power_law_stream(tmp_path):
  path = str(tmp_path / "edges.tsv")
  specs = generate.power_law(path, num_nodes=5000, num_edges=30_001, num_relations=3,
                             seed=3, chunk_edges=7000, progress=False)
  assert len(specs) == 1
  spec = specs[0]
  assert (spec["source"], spec["relation"], spec["target"]) == (0, 1, 2)
  assert spec["path"] == os.path.abspath(path)
  lines = open(path).read().splitlines()
  assert len(lines) == 30_001
  rows = [line.split("\t") for line in lines]
  assert all(len(r) == 3 for r in rows)
  assert all(re.fullmatch(r"n\d+", r[0]) and re.fullmatch(r"n\d+", r[2]) for r in rows)
  ids = np.array([int(r[0][1:]) for r in rows] + [int(r[2][1:]) for r in rows])
  assert ids.min() >= 0 and ids.max() < 5000
  rel_counts = collections.Counter(r[1] for r in rows)
  assert set(rel_counts) == {"r0", "r1", "r2"}
  assert specs.summary["edge_counts"] == dict(rel_counts)
  assert rel_counts["r0"] > rel_counts["r1"] > rel_counts["r2"]  # relation_exponent 1
  # Hubs: the top 1% of sources carry far more than 1% (measured ~0.25).
  counts = np.sort(np.bincount(ids[:30_001], minlength=5000))[::-1]
  assert counts[:50].sum() / counts.sum() > 0.15
  # Same bytes whatever the chunk size; another seed differs.
  again = str(tmp_path / "again.tsv")
  generate.power_law(again, num_nodes=5000, num_edges=30_001, num_relations=3, seed=3,
                     chunk_edges=30_001, progress=False)
  assert open(again, "rb").read() == open(path, "rb").read()
  other = str(tmp_path / "other.tsv")
  generate.power_law(other, num_nodes=5000, num_edges=30_001, num_relations=3, seed=4,
                     progress=False)
  assert open(other, "rb").read() != open(path, "rb").read()


def test_power_law_paths_and_schema(tmp_path):
  specs = generate.power_law(str(tmp_path), num_nodes=10, num_edges=100, progress=False,
                             prefix="")
  assert specs[0]["path"] == str(tmp_path / "power_law.tsv")
  assert all(re.fullmatch(r"\d+\tr\d\t\d+", l) for l in open(specs[0]["path"]).read().splitlines())
  gz = generate.power_law(str(tmp_path / "e.tsv.gz"), num_nodes=10, num_edges=100,
                          progress=False)
  import gzip
  assert len(gzip.open(gz[0]["path"], "rt").read().splitlines()) == 100
  entities, relations = generate.power_law_schema(num_partitions=4, num_relations=4)
  c = config_lib.base_config()
  c.entities = entities
  c.relations = relations
  c.data.files = list(specs)
  config_lib.validate(c)
  assert [r["name"] for r in relations] == ["r0", "r1", "r2", "r3"]


def test_power_law_bounded_memory(tmp_path):
  path = str(tmp_path / "big.tsv")
  tracemalloc.start()
  try:
    generate.power_law(path, num_nodes=1_000_000, num_edges=2_000_000,
                       chunk_edges=200_000, progress=False)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  # A chunk's numpy arrays are ~ 200k * 8 bytes * a few = ~6 MB; holding all
  # 2M edges would be > 16 MB per int64 column alone.
  assert peak < 12 * 2**20, peak
  with open(path, "rb") as f:
    assert sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b"")) == 2_000_000
