"""Deterministic synthetic graphs: the demo dataset and a scale benchmark.

Both generators write plain TSV edge files and return the list of
:func:`twhin_jax.config.file_spec` entries that describe them, ready for
``config.data.files``. They are seeded: the same arguments give identical
bytes.

Popularity model (shared by both)
---------------------------------
Power-law degrees come from Zipf rank weights. The entities of a type are put
in a random order (a seeded permutation), and the entity of rank r (0-based)
gets the weight

    w(r) = (r + 1) ** (-s)                                          (1)

Edges pick their endpoints independently in proportion to these weights, so
the expected degree of the rank-r entity is E * w(r) / sum_k w(k). For
0 < s < 1 the expected number of entities with degree above d falls as
d ** (-1 / s) (a power law with density exponent 1 + 1/s), and the top
fraction p of N entities carries about

    ((p N) ** (1 - s) - 1) / (N ** (1 - s) - 1)                     (1a)

of the edges, which tends to p ** (1 - s) for large N (s = 0.8, N = 20k: 30%;
N -> inf: 40%; uniform would be 1%). twitter_like's distinct-pair rule trims
the hubs further (measured at the defaults: the top 1% of users are the
sources of ~20% of the follows, clicks and favorites; the top 1% of tweets get
~22% of the favorites).

twitter_like: the demo graph
----------------------------
Entity types and names (distinct prefixes, so names are unique across types):
user "u<i>", tweet "t<i>", advertiser "a<i>", ad "ad<i>".

* Every user and every advertiser belongs to one of K communities, drawn
  uniformly. A tweet belongs to its author's community and an ad to its
  advertiser's.
* Users have an activity weight (eq. 1, exponent ``activity_exponent``) and,
  independently, a popularity weight (exponent ``popularity_exponent``);
  tweets, ads and advertisers have popularity weights too.
* authors (user -> tweet): each tweet has exactly one author, drawn by
  activity (so tweets per user follow eq. 1).
* promotes (advertiser -> ad): each ad has exactly one advertiser; the first
  ``num_advertisers`` ads go one to each advertiser (none is left without an
  ad), the rest are drawn by advertiser popularity.
* follows (user -> user), favorites / retweets / replies (user -> tweet),
  clicks (user -> ad): the source user is drawn by activity; with probability
  ``community_affinity`` the target is drawn by popularity among the items of
  the source's community, otherwise by popularity among all items:

      P(t | s) = a * w_t [c_t = c_s] / W_{c_s} + (1 - a) * w_t / W   (2)

  so the measured same-community share is a + (1 - a) * sum_c P(c_s = c)
  W_c / W (about a + (1 - a) / K). Every user follows at least one user (the
  first ``num_users`` follows have each user once as source), so every
  entity occurs in some edge. Edges of a relation are distinct pairs: a
  duplicate is redrawn (new source, same local/global mode, so the local
  share stays a); follows has no self-loops. Relations use separate random
  streams, so changing one relation's count leaves the others unchanged.

Files written in ``out_dir``: one ``<relation>.tsv`` per relation with lines
``source<TAB>target`` (no header, no relation column), ``communities.tsv``
(header ``type<TAB>name<TAB>community``, one line per entity) and
``twitter_like.json`` (arguments, entity and edge counts, files).

power_law: the scale benchmark
------------------------------
One entity type "node" ("n<i>"), relations "r0".."r{R-1}", one file of lines
``n<src><TAB>r<k><TAB>n<dst>``. The source and target of each edge are drawn
independently by eq. (1) with exponent s over N nodes, by inverse CDF of the
continuous density x ** (-s) on [1, N + 1):

    x = (1 + u * ((N + 1) ** (1 - s) - 1)) ** (1 / (1 - s)),  rank = floor(x) - 1

(s = 1: x = (N + 1) ** u), with u uniform. A rank becomes a node id through a
seeded affine permutation id = (a * rank + b) mod N (gcd(a, N) = 1; one for
sources, another for targets), which spreads the hubs over the id range in
O(1) memory. The relation is drawn with P(r_k) proportional to
(k + 1) ** (-relation_exponent). Duplicate edges and self-loops are allowed.
The output is written in chunks of ``chunk_edges`` edges, so memory does not
grow with ``num_edges``; the bytes do not depend on ``chunk_edges``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from twhin_jax import config as config_lib

# ----------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------

_TSV = pcsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")


class GeneratedFiles(list):
  """A list of file_spec dicts, plus ``summary`` (counts, paths, arguments)."""

  summary: dict

  def __init__(self, specs, summary: dict):
    super().__init__(specs)
    self.summary = summary


def zipf_weights(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
  """Eq. (1): entity i gets (rank_i + 1) ** -exponent, ranks a random permutation."""
  ranks = rng.permutation(n)
  return (ranks + 1.0) ** (-float(exponent))


def _names(prefix: str, ids) -> pa.Array:
  """Arrow string array prefix + decimal id."""
  ids = pa.array(np.asarray(ids, dtype=np.int64))
  digits = pc.cast(ids, pa.string())
  if not prefix:
    return digits
  return pc.binary_join_element_wise(prefix, digits, "")


def _write_tsv(path: str, columns: list[pa.Array], header: list[str] | None = None):
  names = [f"c{i}" for i in range(len(columns))]
  table = pa.table(columns, names=names)
  with pa.OSFile(path, "wb") as sink:
    if header:
      sink.write(("\t".join(header) + "\n").encode())
    pcsv.write_csv(table, sink, _TSV)


def _rngs(seed: int, names) -> dict[str, np.random.Generator]:
  """One independent stream per component, so one count does not shift another."""
  return {name: np.random.default_rng([int(seed), i]) for i, name in enumerate(names)}


class _Sampler:
  """Draws entity ids in proportion to weights, globally or within a community."""

  def __init__(self, weights: np.ndarray, communities: np.ndarray, num_communities: int):
    self.order = np.argsort(communities, kind="stable")
    cum = np.cumsum(weights[self.order])
    self.cum = cum
    counts = np.bincount(communities, minlength=num_communities)
    self.ends = np.cumsum(counts)
    self.starts = self.ends - counts
    padded = np.concatenate([[0.0], cum])
    self.base = padded[self.starts]
    self.total = padded[self.ends] - self.base

  def sample(self, rng: np.random.Generator, n: int, community: np.ndarray | None = None,
             local: np.ndarray | None = None) -> np.ndarray:
    """n ids; where ``local`` is set, only among the items of ``community``."""
    u = rng.random(n)
    x = u * self.cum[-1]
    if local is not None:
      local = local & (self.total[community] > 0)  # empty community: global
      c = community[local]
      x[local] = self.base[c] + u[local] * self.total[c]
    idx = np.searchsorted(self.cum, x, side="right")
    np.minimum(idx, len(self.cum) - 1, out=idx)
    if local is not None:  # rounding must not leave the community's segment
      c = community[local]
      idx[local] = np.clip(idx[local], self.starts[c], self.ends[c] - 1)
    return self.order[idx]


def _distinct_edges(draw, n: int, num_targets: int, rng: np.random.Generator,
                    affinity: float, forced_src: np.ndarray | None = None,
                    max_rounds: int = 200) -> tuple[np.ndarray, np.ndarray]:
  """n distinct (src, dst) pairs from draw(src_or_None, local) -> (src, dst).

  Each edge is first given its mode (local: inside the source's community,
  with probability ``affinity``). A duplicate pair is dropped and redrawn
  with the same mode (a new source too), so the share of local edges stays
  that of the model. ``forced_src`` sources come first (one edge each).
  Pairs are kept in drawn order.
  """
  local = rng.random(n) < affinity
  num_forced = 0 if forced_src is None else len(forced_src)
  if num_forced:
    s, d = draw(np.asarray(forced_src), local[:num_forced])
    s2, d2 = draw(None, local[num_forced:])
    src, dst = np.concatenate([s, s2]), np.concatenate([d, d2])
  else:
    src, dst = draw(None, local)
  for _ in range(max_rounds):
    key = src.astype(np.int64) * num_targets + dst
    _, first = np.unique(key, return_index=True)
    if len(first) == len(key):
      return src, dst
    keep = np.zeros(len(key), bool)
    keep[first] = True
    redo = local[~keep]
    s, d = draw(None, redo)
    src = np.concatenate([src[keep], s])
    dst = np.concatenate([dst[keep], d])
    local = np.concatenate([local[keep], redo])
  raise ValueError(f"could not draw {n} distinct edges in {max_rounds} rounds: "
                   "too many edges for the number of entities")


# ----------------------------------------------------------------------------
# twitter_like
# ----------------------------------------------------------------------------

TWITTER_ENTITIES = ("user", "tweet", "advertiser", "ad")
TWITTER_PREFIXES = {"user": "u", "tweet": "t", "advertiser": "a", "ad": "ad"}
#: (name, source type, target type), in config order.
TWITTER_RELATIONS = (
    ("follows", "user", "user"),
    ("authors", "user", "tweet"),
    ("favorites", "user", "tweet"),
    ("retweets", "user", "tweet"),
    ("replies", "user", "tweet"),
    ("promotes", "advertiser", "ad"),
    ("clicks", "user", "ad"),
)
#: Default engagement edges per user (authors/promotes are fixed by the counts).
EDGES_PER_USER = {"follows": 20.0, "favorites": 40.0, "retweets": 12.0,
                  "replies": 8.0, "clicks": 5.0}


def twitter_like(out_dir: str, *, num_users: int = 20_000, num_tweets: int = 100_000,
                 num_advertisers: int = 500, num_ads: int = 5_000,
                 num_communities: int = 20,
                 edges_per_user: Mapping[str, float] | None = None,
                 num_edges: Mapping[str, int] | None = None,
                 community_affinity: float = 0.8,
                 activity_exponent: float = 0.8, popularity_exponent: float = 0.8,
                 seed: int = 0) -> GeneratedFiles:
  """Writes the twitter-like demo graph into ``out_dir`` (see the module doc).

  Args:
    edges_per_user: per engagement relation (follows, favorites, retweets,
      replies, clicks), edges = round(rate * num_users); defaults
      :data:`EDGES_PER_USER` (about 1.8M edges in all at the default sizes).
    num_edges: absolute edge counts per engagement relation; override the
      rates.
    community_affinity: probability that an engagement stays inside the
      source user's community (eq. 2).
    activity_exponent, popularity_exponent: exponents s of eq. (1) for user
      activity (out-degree) and for the popularity (in-degree) of users,
      tweets, ads and advertisers.

  Returns:
    file_spec dicts (one per relation, split "train"); ``.summary`` holds the
    entity and edge counts and paths (also written to ``twitter_like.json``).
  """
  counts = dict(user=int(num_users), tweet=int(num_tweets),
                advertiser=int(num_advertisers), ad=int(num_ads))
  for name, n in counts.items():
    if n < 1:
      raise ValueError(f"num_{name}s must be >= 1, got {n}")
  if num_users < 2:
    raise ValueError(f"num_users must be >= 2 (follows has no self-loops), got {num_users}")
  if num_ads < num_advertisers:
    raise ValueError(f"num_ads ({num_ads}) must be >= num_advertisers ({num_advertisers})")
  if num_communities < 1:
    raise ValueError(f"num_communities must be >= 1, got {num_communities}")
  if not 0.0 <= community_affinity <= 1.0:
    raise ValueError(f"community_affinity must be in [0, 1], got {community_affinity}")
  rates = dict(EDGES_PER_USER)
  rates.update(edges_per_user or {})
  unknown = set(rates) - set(EDGES_PER_USER)
  unknown |= set(num_edges or {}) - set(EDGES_PER_USER)
  if unknown:
    raise ValueError(f"unknown engagement relations {sorted(unknown)}; "
                     f"choose from {sorted(EDGES_PER_USER)}")
  targets = {rel: int(round(rate * num_users)) for rel, rate in rates.items()}
  targets.update({rel: int(n) for rel, n in (num_edges or {}).items()})
  if targets["follows"] < num_users:
    raise ValueError(f"follows ({targets['follows']}) must be >= num_users ({num_users}): "
                     "every user follows someone")

  K = int(num_communities)
  rng = _rngs(seed, ["community", "weights", "authors", "promotes", "follows",
                     "favorites", "retweets", "replies", "clicks"])
  U, T, A, D = num_users, num_tweets, num_advertisers, num_ads

  # Communities and weights.
  user_comm = rng["community"].integers(K, size=U)
  adv_comm = rng["community"].integers(K, size=A)
  w = rng["weights"]
  user_activity = zipf_weights(U, activity_exponent, w)
  user_pop = zipf_weights(U, popularity_exponent, w)
  tweet_pop = zipf_weights(T, popularity_exponent, w)
  adv_pop = zipf_weights(A, popularity_exponent, w)
  ad_pop = zipf_weights(D, popularity_exponent, w)

  zeros_u = np.zeros(U, np.int64)
  activity = _Sampler(user_activity, zeros_u, 1)

  # authors: one author per tweet; the tweet takes its author's community.
  tweet_author = activity.sample(rng["authors"], T)
  tweet_comm = user_comm[tweet_author]
  # promotes: one advertiser per ad, every advertiser at least one ad.
  ad_adv = np.concatenate([
      np.arange(A), _Sampler(adv_pop, np.zeros(A, np.int64), 1).sample(rng["promotes"], D - A)])
  ad_comm = adv_comm[ad_adv]

  edges: dict[str, tuple[np.ndarray, np.ndarray]] = {}
  edges["authors"] = (tweet_author, np.arange(T))
  edges["promotes"] = (ad_adv, np.arange(D))

  def engagement(rel, target_sampler, num_targets, forced_src=None, no_self=False):
    r = rng[rel]

    def draw(src, local):
      if src is None:
        src = activity.sample(r, len(local))
      dst = target_sampler.sample(r, len(local), user_comm[src], local)
      if no_self:
        loops = np.flatnonzero(dst == src)
        tries = 0
        while len(loops):
          mode = local[loops] & (tries < 50)  # a one-user community: go global
          dst[loops] = target_sampler.sample(r, len(loops), user_comm[src[loops]], mode)
          loops = loops[dst[loops] == src[loops]]
          tries += 1
      return src, dst

    return _distinct_edges(draw, targets[rel], num_targets, r, community_affinity,
                           forced_src)

  user_sampler = _Sampler(user_pop, user_comm, K)
  tweet_sampler = _Sampler(tweet_pop, tweet_comm, K)
  ad_sampler = _Sampler(ad_pop, ad_comm, K)
  edges["follows"] = engagement("follows", user_sampler, U, forced_src=np.arange(U),
                                no_self=True)
  for rel in ("favorites", "retweets", "replies"):
    edges[rel] = engagement(rel, tweet_sampler, T)
  edges["clicks"] = engagement("clicks", ad_sampler, D)

  # Write.
  os.makedirs(out_dir, exist_ok=True)
  name_arrays = {t: _names(TWITTER_PREFIXES[t], np.arange(counts[t])) for t in TWITTER_ENTITIES}
  specs, files = [], {}
  for rel, source, target in TWITTER_RELATIONS:
    src, dst = edges[rel]
    path = os.path.abspath(os.path.join(out_dir, f"{rel}.tsv"))
    _write_tsv(path, [name_arrays[source].take(pa.array(src)),
                      name_arrays[target].take(pa.array(dst))])
    specs.append(config_lib.file_spec(path, split="train", source=0, target=1,
                                      relation=None, relation_name=rel, format="tsv"))
    files[rel] = path

  comm_path = os.path.abspath(os.path.join(out_dir, "communities.tsv"))
  type_col, name_col, comm_col = [], [], []
  for t, comm in (("user", user_comm), ("tweet", tweet_comm),
                  ("advertiser", adv_comm), ("ad", ad_comm)):
    type_col.append(pa.array(np.full(counts[t], t, dtype=object), pa.string()))
    name_col.append(name_arrays[t])
    comm_col.append(pa.array(comm.astype(np.int64)))
  _write_tsv(comm_path, [pa.concat_arrays(type_col), pa.concat_arrays(name_col),
                         pa.concat_arrays(comm_col)], header=["type", "name", "community"])

  summary = dict(
      generator="twitter_like",
      args=dict(num_users=U, num_tweets=T, num_advertisers=A, num_ads=D,
                num_communities=K, edges_per_user=rates, num_edges=dict(num_edges or {}),
                community_affinity=community_affinity,
                activity_exponent=activity_exponent,
                popularity_exponent=popularity_exponent, seed=seed),
      entity_counts=counts,
      edge_counts={rel: int(len(edges[rel][0])) for rel, _, _ in TWITTER_RELATIONS},
      total_edges=int(sum(len(e[0]) for e in edges.values())),
      files=files, communities=comm_path)
  with open(os.path.join(out_dir, "twitter_like.json"), "w") as f:
    json.dump(summary, f, indent=2, sort_keys=True)
  return GeneratedFiles(specs, summary)


def twitter_like_schema(num_partitions: int = 1, dim: int = 0,
                        partitioned: tuple[str, ...] | None = None,
                        operator: str = "translation") -> tuple[dict, list]:
  """(entities, relations) of the twitter-like graph, ready for a config.

  ``partitioned`` names the types split into ``num_partitions`` (default:
  all); the others get 1. ``dim=0`` means ``model.dim``.
  """
  partitioned = TWITTER_ENTITIES if partitioned is None else tuple(partitioned)
  entities = {t: dict(num_partitions=int(num_partitions) if t in partitioned else 1,
                      dim=int(dim))
              for t in TWITTER_ENTITIES}
  relations = [dict(name=name, source=source, target=target, operator=operator, weight=1.0)
               for name, source, target in TWITTER_RELATIONS]
  return entities, relations


def read_communities(path: str) -> dict[str, dict[str, int]]:
  """communities.tsv -> {entity type: {name: community}}."""
  table = pcsv.read_csv(path, parse_options=pcsv.ParseOptions(delimiter="\t"),
                        convert_options=pcsv.ConvertOptions(
                            column_types={"type": pa.string(), "name": pa.string(),
                                          "community": pa.int64()}))
  out: dict[str, dict[str, int]] = {}
  for t, name, comm in zip(table["type"].to_pylist(), table["name"].to_pylist(),
                           table["community"].to_pylist()):
    out.setdefault(t, {})[name] = comm
  return out


# ----------------------------------------------------------------------------
# power_law
# ----------------------------------------------------------------------------


def _affine_permutation(n: int, rng: np.random.Generator) -> tuple[int, int]:
  """(a, b) with gcd(a, n) = 1, so r -> (a * r + b) mod n is a bijection of [0, n)."""
  if n == 1:
    return 1, 0
  limit = max(2, min(n, (2 ** 63 - 1) // n))  # a * rank stays inside int64
  while True:
    a = int(rng.integers(1, limit))
    if math.gcd(a, n) == 1:
      return a, int(rng.integers(0, n))


def zipf_ranks(u: np.ndarray, n, exponent: float) -> np.ndarray:
  """Inverse CDF of density x ** -s on [1, n + 1): ranks 0..n-1 with P ~ (r+1)^-s.

  ``n`` is one population size, or one per draw (an int array shaped like
  ``u``: ranks in [0, n_i))."""
  s = float(exponent)
  per_draw = isinstance(n, np.ndarray)
  size = n.astype(np.float64) if per_draw else n
  if s == 0.0:
    x = 1.0 + u * size
  elif abs(s - 1.0) < 1e-12:
    x = np.exp(u * (np.log(size + 1.0) if per_draw else math.log(size + 1.0)))
  else:
    x = (1.0 + u * ((size + 1.0) ** (1.0 - s) - 1.0)) ** (1.0 / (1.0 - s))
  ranks = x.astype(np.int64)
  ranks -= 1
  np.clip(ranks, 0, n - 1, out=ranks)
  return ranks


def _edge_file(out_path: str, default_name: str) -> str:
  """The absolute path of a generator's edge file (``default_name`` inside
  ``out_path`` when that is a folder or has no extension); its folder exists."""
  if os.path.isdir(out_path) or not os.path.splitext(out_path)[1]:
    out_path = os.path.join(out_path, default_name)
  out_path = os.path.abspath(out_path)
  os.makedirs(os.path.dirname(out_path), exist_ok=True)
  return out_path


def _write_edges(out_path: str, draw_nodes, rel_rng, *, num_edges: int, chunk_edges: int,
                 num_relations: int, relation_exponent: float, prefix: str, desc: str,
                 progress: bool) -> np.ndarray:
  """Streams ``num_edges`` edges to a ``src<TAB>rel<TAB>dst`` TSV in chunks of
  ``chunk_edges``: ``draw_nodes(k)`` gives the chunk's (src, dst) node ids,
  the relation is Zipf(relation_exponent) over r0..r{R-1} (drawn from
  ``rel_rng``). Memory stays one chunk. Returns the edges per relation [R]."""
  rel_p = (np.arange(1, num_relations + 1, dtype=np.float64)) ** (-float(relation_exponent))
  rel_cum = np.cumsum(rel_p / rel_p.sum())
  rel_cum[-1] = 1.0
  rel_names = pa.array([f"r{k}" for k in range(num_relations)])
  schema = pa.schema([("src", pa.string()), ("rel", pa.string()), ("dst", pa.string())])
  rel_counts = np.zeros(num_relations, np.int64)
  bar = None
  if progress:
    from tqdm.auto import tqdm  # only when a bar is shown
    bar = tqdm(total=num_edges, unit="edge", unit_scale=True, desc=desc)
  sink = (pa.CompressedOutputStream(out_path, "gzip") if out_path.endswith(".gz")
          else pa.OSFile(out_path, "wb"))
  try:
    with sink, pcsv.CSVWriter(sink, schema, write_options=_TSV) as writer:
      done = 0
      while done < num_edges:
        k = min(chunk_edges, num_edges - done)
        src, dst = draw_nodes(k)
        rel = np.searchsorted(rel_cum, rel_rng.random(k), side="right")
        np.minimum(rel, num_relations - 1, out=rel)
        rel_counts += np.bincount(rel, minlength=num_relations)
        writer.write_table(pa.Table.from_arrays(
            [_names(prefix, src), rel_names.take(pa.array(rel.astype(np.int32))),
             _names(prefix, dst)], schema=schema))
        done += k
        if bar is not None:
          bar.update(k)
  finally:
    if bar is not None:
      bar.close()
  return rel_counts


def _check_sizes(generator: str, num_nodes: int, num_edges: int, num_relations: int,
                 chunk_edges: int) -> None:
  if num_nodes < 1 or num_edges < 0 or num_relations < 1 or chunk_edges < 1:
    raise ValueError(f"{generator} needs num_nodes >= 1, num_edges >= 0, "
                     "num_relations >= 1, chunk_edges >= 1")


def _power_law_draws(num_nodes: int, exponent: float, rng: dict):
  """``draw(k) -> (src [k], dst [k])``: eq. (1) ranks of each side (streams
  ``rng["src"]``, ``rng["dst"]``) mapped to node ids by that side's affine
  permutation (two draws from ``rng["perm"]``, source first)."""
  permutations = [_affine_permutation(num_nodes, rng["perm"]) for _ in ("src", "dst")]

  def draw(k: int) -> tuple[np.ndarray, np.ndarray]:
    out = []
    for side, (a, b) in zip(("src", "dst"), permutations):
      ids = zipf_ranks(rng[side].random(k), num_nodes, exponent)
      ids *= a  # in place: one [k] array per side
      ids += b
      ids %= num_nodes
      out.append(ids)
    return out[0], out[1]

  return draw


def _write_power_law(out_path: str, generator: str, draw_nodes, rel_rng, *, num_nodes: int,
                     num_edges: int, num_relations: int, exponent: float,
                     relation_exponent: float, seed: int, prefix: str, chunk_edges: int,
                     progress: bool, extra_args: Mapping | None = None,
                     extra_summary=dict) -> GeneratedFiles:
  """Writes a power-law generator's TSV (``_write_edges``) and describes it:
  one file_spec (source 0, relation 1, target 2) and the summary, with the
  generator's own arguments (``extra_args``) and figures (``extra_summary()``,
  called once every edge is drawn)."""
  rel_counts = _write_edges(out_path, draw_nodes, rel_rng, num_edges=num_edges,
                            chunk_edges=chunk_edges, num_relations=num_relations,
                            relation_exponent=relation_exponent, prefix=prefix,
                            desc=generator, progress=progress)
  spec = config_lib.file_spec(out_path, split="train", source=0, relation=1, target=2,
                              format="tsv")
  summary = dict(generator=generator,
                 args=dict(num_nodes=int(num_nodes), num_edges=int(num_edges),
                           num_relations=int(num_relations), **(extra_args or {}),
                           exponent=float(exponent), relation_exponent=float(relation_exponent),
                           seed=int(seed), prefix=prefix),
                 entity_counts={"node": int(num_nodes)},  # at most: unused ids are absent
                 edge_counts={f"r{k}": int(n) for k, n in enumerate(rel_counts)},
                 total_edges=int(num_edges), **extra_summary(), files={"edges": out_path})
  return GeneratedFiles([spec], summary)


def power_law(out_path: str, *, num_nodes: int, num_edges: int, num_relations: int = 4,
              exponent: float = 0.8, relation_exponent: float = 1.0, seed: int = 0,
              chunk_edges: int = 1_000_000, progress: bool = True,
              prefix: str = "n") -> GeneratedFiles:
  """Streams a power-law multigraph to one TSV ``src<TAB>rel<TAB>dst`` file.

  See the module doc for the model. ``out_path`` is the file (a ``.gz``
  suffix compresses it); an existing directory, or a path without suffix,
  gets ``power_law.tsv`` inside. ``prefix=""`` writes plain integer names.

  Returns one file_spec (source 0, relation 1, target 2); ``.summary`` holds
  the counts.
  """
  _check_sizes("power_law", num_nodes, num_edges, num_relations, chunk_edges)
  if not 0.0 <= exponent:
    raise ValueError(f"exponent must be >= 0, got {exponent}")
  out_path = _edge_file(out_path, "power_law.tsv")
  rng = _rngs(seed, ["perm", "src", "dst", "rel"])
  return _write_power_law(
      out_path, "power_law", _power_law_draws(num_nodes, exponent, rng), rng["rel"],
      num_nodes=num_nodes, num_edges=num_edges, num_relations=num_relations,
      exponent=exponent, relation_exponent=relation_exponent, seed=seed, prefix=prefix,
      chunk_edges=chunk_edges, progress=progress)


def power_law_schema(num_partitions: int = 1, num_relations: int = 4, dim: int = 0,
                     operator: str = "translation") -> tuple[dict, list]:
  """(entities, relations) of the power_law graph, ready for a config."""
  entities = {"node": dict(num_partitions=int(num_partitions), dim=int(dim))}
  relations = [dict(name=f"r{k}", source="node", target="node", operator=operator,
                    weight=1.0) for k in range(num_relations)]
  return entities, relations


# ----------------------------------------------------------------------------
# power_law_communities
# ----------------------------------------------------------------------------

#: Multiplier of the within-community permutation: a prime above any
#: community size, so j -> (A * j + b) mod n is a bijection for every n < A.
_COMMUNITY_PRIME = 2_147_483_647


def power_law_communities(out_path: str, *, num_nodes: int, num_edges: int,
                          num_relations: int = 4, num_communities: int = 100,
                          community_affinity: float = 0.8, exponent: float = 0.8,
                          relation_exponent: float = 1.0, seed: int = 0,
                          chunk_edges: int = 1_000_000, progress: bool = True,
                          prefix: str = "n") -> GeneratedFiles:
  """power_law with planted communities: a benchmark graph whose MRR means something.

  The same file format, sources and relations as :func:`power_law`. Node v
  belongs to community v mod K (the affine id permutation already scatters
  popularity, so communities are alike). With probability a
  (``community_affinity``) an edge's target is drawn in the source's
  community c, otherwise as power_law draws it:

      P(t | s) = a * [t mod K = c] w_c(t) / W_c + (1 - a) * w(t) / W       (3)

  where w is eq. (1) over all N nodes and w_c is eq. (1) over the
  n_c = ceil((N - c) / K) members of c, ranked by their own seeded
  permutation: local rank r -> member c + K * ((A * r + b) mod n_c), A prime.
  The expected same-community share of edges is a + (1 - a) / K. Memory
  stays bounded (no per-node arrays); the bytes depend only on the
  arguments, not on ``chunk_edges``.
  """
  if num_communities < 1 or num_communities > num_nodes:
    raise ValueError(f"num_communities must be in [1, num_nodes], got {num_communities}")
  if not 0.0 <= community_affinity <= 1.0:
    raise ValueError(f"community_affinity must be in [0, 1], got {community_affinity}")
  _check_sizes("power_law_communities", num_nodes, num_edges, num_relations, chunk_edges)
  if -(-num_nodes // num_communities) >= _COMMUNITY_PRIME:
    raise ValueError(f"communities of more than {_COMMUNITY_PRIME - 1} nodes are not supported")
  out_path = _edge_file(out_path, "power_law_communities.tsv")
  k_comm = int(num_communities)
  rng = _rngs(seed, ["perm", "src", "dst", "rel", "local", "local_dst"])
  draw_global = _power_law_draws(num_nodes, exponent, rng)
  local_b = int(rng["perm"].integers(0, 2 ** 31))
  same_community = 0

  def draw_nodes(k: int) -> tuple[np.ndarray, np.ndarray]:
    nonlocal same_community
    src, dst = draw_global(k)
    local = rng["local"].random(k) < community_affinity  # [k]
    u_local = rng["local_dst"].random(k)  # drawn for every edge: bytes independent of a
    community = src[local] % k_comm
    size = (num_nodes - community + k_comm - 1) // k_comm  # n_c
    rank = zipf_ranks(u_local[local], size, exponent)
    dst[local] = community + k_comm * ((_COMMUNITY_PRIME * rank + local_b) % size)
    same_community += int(np.count_nonzero(src % k_comm == dst % k_comm))
    return src, dst

  return _write_power_law(
      out_path, "power_law_communities", draw_nodes, rng["rel"], num_nodes=num_nodes,
      num_edges=num_edges, num_relations=num_relations,
      extra_args=dict(num_communities=k_comm, community_affinity=float(community_affinity)),
      exponent=exponent, relation_exponent=relation_exponent, seed=seed, prefix=prefix,
      chunk_edges=chunk_edges, progress=progress,
      extra_summary=lambda: dict(
          same_community_share=same_community / max(num_edges, 1),
          community_rule=f"community of {prefix}<i> = i mod {k_comm}"))


# ----------------------------------------------------------------------------
# By name (config.data.generator)
# ----------------------------------------------------------------------------

#: name -> (generator(out, **args) -> file specs, schema helper).
GENERATORS = {"twitter_like": (twitter_like, twitter_like_schema),
              "power_law": (power_law, power_law_schema),
              "power_law_communities": (power_law_communities, power_law_schema)}


def run_generator(name: str, out_dir: str, **kwargs) -> GeneratedFiles:
  """Runs generator ``name`` into ``out_dir`` (power_law: ``out_dir/power_law.tsv``)."""
  if name not in GENERATORS:
    raise ValueError(f"unknown generator {name!r}; choose from {sorted(GENERATORS)}")
  return GENERATORS[name][0](out_dir, **kwargs)


def main(argv=None):
  parser = argparse.ArgumentParser(description="Write a synthetic graph (TSV files).")
  parser.add_argument("name", choices=sorted(GENERATORS))
  parser.add_argument("out", help="output directory (power_law: a file or directory)")
  parser.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                      help="generator keyword argument (int, float or string)")
  args = parser.parse_args(argv)
  kwargs = {}
  for item in args.arg:
    key, _, value = item.partition("=")
    for cast in (int, float):
      try:
        value = cast(value.replace("_", ""))
        break
      except ValueError:
        continue
    kwargs[key] = value
  start = time.perf_counter()
  specs = run_generator(args.name, args.out, **kwargs)
  print(json.dumps(dict(specs.summary, seconds=round(time.perf_counter() - start, 2)),
                   indent=2))


if __name__ == "__main__":
  main()
