"""An HTTP JSON API over one trained run: neighbours, diverse retrieval,
scores, embeddings, and hot reload of newer checkpoints.

    twhin serve --workdir DIR [--port 8080] [--host 127.0.0.1] [--watch SECONDS]

Routes (the OpenAPI 3 description is served at ``GET /openapi.json``)::

  GET  /health      status, version id, checkpoint, loaded-at, counts, requests
  GET  /version     lineage of the loaded checkpoint (version, parent, hashes, created)
  POST /neighbors   {entity_type, name, relation?, k?, direction?, exact?}
  POST /diverse     {entity_type, name | engagements, target_type, k?, exact?, exclude?}
  POST /score       {triples: [[source, relation, target], ...]}
  POST /embedding   {entity_type, names: [...]}
  POST /reload      {force?}: switch to the run's latest checkpoint

Scores are the model's f(s, r, t) = compare(op_r(theta_s), theta_t) (model.py
eq. 1); neighbours come from ``retrieval.Retriever`` (ScaNN or exact).

Server. The standard library's ``ThreadingHTTPServer`` (HTTP/1.1, keep-alive,
one thread per connection): no dependency, and the work of a request
(a jitted matmul, a ScaNN call) releases the GIL, so threads overlap.

Versions without dropped requests. Everything a request needs (the
Retriever with its tables, names, searchers and relation parameters, and the
lineage) lives in one immutable ``Snapshot``. A handler reads the service's
reference once and uses that snapshot to the end. A reload (``POST /reload``
or the ``--watch`` poller) builds and warms a complete new snapshot in the
background while requests keep being served from the old one, then replaces
the reference in one assignment (atomic in CPython). In-flight requests
finish on the old snapshot, which is freed when the last one lets go. The
export files it memory-maps are replaced by rename (export.py), so the old
mapping keeps the old bytes. A failed reload keeps the old snapshot and is
reported in /health.

Safety. A request carries only JSON values: names are looked up in the
vocabularies, relations and types in the run's schema; nothing in a request
is a path or code. Bodies are limited (``max_body`` bytes, 1 MiB by default),
as are k (1..1000), names per request and triples per request. Errors are
JSON ``{"error": message}`` with a 4xx status (5xx only for bugs).
"""

from __future__ import annotations

import dataclasses
import datetime
import http.server
import json
import logging
import os
import threading
import time
from typing import Any

import numpy as np

from twhin_jax import retrieval

log = logging.getLogger(__name__)

API_VERSION = "1"
MAX_BODY = 1 << 20
MAX_K = 1000
MAX_NAMES = 1000
MAX_TRIPLES = 10_000
MAX_ENGAGEMENTS = 10_000


class ApiError(Exception):
  """A request error: HTTP status and a message for the client."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status
    self.message = message


# ---------------------------------------------------------------------------
# Request validation.


def _field(body: dict, name: str, kind, *, required: bool = True, default=None):
  """body[name] checked against a JSON type (bool is not an int here)."""
  if name not in body or body[name] is None:
    if required:
      raise ApiError(400, f"missing field {name!r}")
    return default
  value = body[name]
  kinds = kind if isinstance(kind, tuple) else (kind,)
  if isinstance(value, bool) and bool not in kinds:
    raise ApiError(400, f"field {name!r} must be {_type_name(kind)}, got a boolean")
  if not isinstance(value, kinds):
    raise ApiError(400, f"field {name!r} must be {_type_name(kind)}, "
                   f"got {type(value).__name__}")
  return value


def _type_name(kind) -> str:
  names = {str: "a string", int: "an integer", bool: "a boolean", list: "an array",
           dict: "an object"}
  kinds = kind if isinstance(kind, tuple) else (kind,)
  return " or ".join(names.get(k, k.__name__) for k in kinds)


def _check_fields(body: dict, allowed: tuple[str, ...]) -> None:
  unknown = sorted(set(body) - set(allowed))
  if unknown:
    raise ApiError(400, f"unknown fields {unknown}; allowed: {list(allowed)}")


def _k(body: dict, default: int = 10) -> int:
  k = _field(body, "k", int, required=False, default=default)
  if not 1 <= k <= MAX_K:
    raise ApiError(400, f"k must be in [1, {MAX_K}], got {k}")
  return k


def _string_list(body: dict, name: str, limit: int) -> list[str]:
  values = _field(body, name, list)
  if not values:
    raise ApiError(400, f"field {name!r} must not be empty")
  if len(values) > limit:
    raise ApiError(400, f"field {name!r} has {len(values)} items; at most {limit}")
  for i, value in enumerate(values):
    if not isinstance(value, str):
      raise ApiError(400, f"{name}[{i}] must be a string, got {type(value).__name__}")
  return values


# ---------------------------------------------------------------------------
# One loaded version.


@dataclasses.dataclass(frozen=True)
class Snapshot:
  """Everything a request reads, for one checkpoint (never mutated after
  ``load_snapshot`` except the mixture cache, guarded by its lock)."""
  retriever: retrieval.Retriever
  lineage: dict
  checkpoint: dict
  loaded_at: str
  load_seconds: float
  mixtures: dict = dataclasses.field(default_factory=dict)
  mixtures_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

  @property
  def version_id(self) -> str:
    return self.lineage.get("version_id", "")


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def load_snapshot(workdir: str, *, exact_below: int = retrieval.EXACT_BELOW,
                  progress: bool = False) -> Snapshot:
  """Opens the run's latest checkpoint (exporting and indexing what is stale)
  and warms every table, name index and searcher, so that no request of the
  new snapshot touches the disk or compiles the exact search for one query."""
  from twhin_jax import checkpoint as checkpoint_lib
  started = time.perf_counter()
  retriever = retrieval.Retriever.open(workdir, exact_below=exact_below, progress=progress)
  step = retriever.run["checkpoint"]["step"]
  meta = checkpoint_lib.read_meta(
      os.path.join(checkpoint_lib.checkpoint_root(workdir), str(step)))
  for entity_type in retriever.entity_types:
    table = retriever.table(entity_type)
    names = retriever.names(entity_type)
    if names:
      retriever.lookup(entity_type, names[0])  # builds the name -> row index
    probe = np.asarray(table[:1], np.float32)
    for k in (10, 11):  # the default k (and k + 1 of same-type neighbours): jit compiled now
      retriever.search(entity_type, probe, k, exact=True)
      retriever.search(entity_type, probe, k, exact=False)
  for rel in retriever.relations.values():
    retriever.neighbors(rel.source, 0, relation=rel.name, k=10, direction="forward")
  return Snapshot(retriever=retriever, lineage=dict(meta.get("lineage", {})),
                  checkpoint=dict(retriever.run["checkpoint"]), loaded_at=_now(),
                  load_seconds=time.perf_counter() - started)


# ---------------------------------------------------------------------------
# The service (routes as methods; no HTTP here).


class Service:
  """The API over a run directory, independent of the HTTP layer."""

  def __init__(self, workdir: str, *, exact_below: int = retrieval.EXACT_BELOW,
               progress: bool = False):
    self.workdir = workdir
    self.exact_below = exact_below
    self.progress = progress
    self.started_at = _now()
    self._reload_lock = threading.Lock()
    self._stats_lock = threading.Lock()
    self.requests = 0
    self.errors = 0
    self.reloads = 0
    self.last_reload_error: str | None = None
    self._watcher: threading.Thread | None = None
    self._stop = threading.Event()
    self.snapshot = load_snapshot(workdir, exact_below=exact_below, progress=progress)

  # -- versions ---------------------------------------------------------------

  def reload(self, force: bool = False) -> dict:
    """Loads the run's latest checkpoint if it differs from the serving one
    (or ``force``), then swaps the snapshot reference. Serialised: a second
    caller waits for the first and then finds nothing new."""
    with self._reload_lock:
      old = self.snapshot
      latest = retrieval.checkpoint_identity(self.workdir)
      if latest["hash"] == old.checkpoint["hash"] and not force:
        return {"reloaded": False, "version_id": old.version_id,
                "checkpoint": old.checkpoint}
      try:
        new = load_snapshot(self.workdir, exact_below=self.exact_below, progress=self.progress)
      except Exception as err:  # keep serving the old version
        self.last_reload_error = f"{type(err).__name__}: {err}"
        log.exception("reload failed; still serving %s", old.version_id)
        raise
      self.snapshot = new  # the atomic swap
      self.reloads += 1
      self.last_reload_error = None
      log.info("now serving %s step %s (was %s step %s)", new.version_id,
               new.checkpoint["step"], old.version_id, old.checkpoint["step"])
      return {"reloaded": True, "version_id": new.version_id, "checkpoint": new.checkpoint,
              "previous": {"version_id": old.version_id, "checkpoint": old.checkpoint},
              "load_seconds": round(new.load_seconds, 3)}

  def watch(self, interval: float) -> None:
    """Polls the latest checkpoint every ``interval`` seconds in a daemon
    thread and reloads when it changes.

    A new checkpoint is loaded once it has been the latest for two polls in a
    row: a trainer writing into the run replaces checkpoints every bucket, and
    one that is half written or already superseded would fail to load. A
    failed load keeps the old snapshot (see /health) and is retried.
    """

    def loop():
      candidate = None
      while not self._stop.wait(interval):
        try:
          latest = retrieval.checkpoint_identity(self.workdir)["hash"]
          if latest == self.snapshot.checkpoint["hash"]:
            candidate = None
          elif latest != candidate:
            candidate = latest  # settle for one more poll
          else:
            self.reload()
            candidate = None
        except Exception as err:  # reported in /health; tried again next poll
          log.warning("watch: no reload this time (%s: %s)", type(err).__name__, err)

    self._watcher = threading.Thread(target=loop, name="twhin-serve-watch", daemon=True)
    self._watcher.start()

  def close(self) -> None:
    self._stop.set()

  def count(self, error: bool) -> None:
    with self._stats_lock:
      self.requests += 1
      self.errors += int(error)

  # -- routes -----------------------------------------------------------------

  def health(self, snap: Snapshot) -> dict:
    run = snap.retriever.run
    return {
        "status": "ok",
        "version_id": snap.version_id,
        "checkpoint": snap.checkpoint,
        "loaded_at": snap.loaded_at,
        "load_seconds": round(snap.load_seconds, 3),
        "started_at": self.started_at,
        "counts": {"entities": {t: int(e["count"]) for t, e in run["entities"].items()},
                   "relations": len(run["relations"])},
        "indexes": {t: m["backend"] for t, m in snap.retriever.manifests.items()},
        "requests": self.requests,
        "errors": self.errors,
        "reloads": self.reloads,
        "last_reload_error": self.last_reload_error,
    }

  def version(self, snap: Snapshot) -> dict:
    lineage = snap.lineage
    return {
        "version_id": lineage.get("version_id"),
        "parent_id": lineage.get("parent_id"),
        "graph_manifest_hash": lineage.get("graph_manifest_hash"),
        "config_hash": lineage.get("config_hash"),
        "created": lineage.get("created"),
        "checkpoint": snap.checkpoint,
        "comparator": snap.retriever.comparator,
        "reciprocal": snap.retriever.reciprocal,
        "relations": snap.retriever.run["relations"],
    }

  def _type(self, snap: Snapshot, body: dict, name: str = "entity_type") -> str:
    value = _field(body, name, str)
    if value not in snap.retriever.run["entities"]:
      raise ApiError(400, f"unknown entity type {value!r}; this run has "
                     f"{sorted(snap.retriever.run['entities'])}")
    return value

  def _relation(self, snap: Snapshot, name: str) -> retrieval.Relation:
    if name not in snap.retriever.relations:
      raise ApiError(400, f"unknown relation {name!r}; this run has "
                     f"{sorted(snap.retriever.relations)}")
    return snap.retriever.relations[name]

  def _row(self, snap: Snapshot, entity_type: str, name: str) -> int:
    try:
      return snap.retriever.lookup(entity_type, name)  # a str: vocabulary lookup only
    except KeyError:
      raise ApiError(404, f"unknown {entity_type} {name!r}") from None

  def neighbors(self, snap: Snapshot, body: dict) -> dict:
    _check_fields(body, ("entity_type", "name", "relation", "k", "direction", "exact"))
    entity_type = self._type(snap, body)
    name = _field(body, "name", str)
    relation = _field(body, "relation", str, required=False)
    k = _k(body)
    direction = _field(body, "direction", str, required=False)
    exact = _field(body, "exact", bool, required=False, default=False)
    row = self._row(snap, entity_type, name)
    target_type = entity_type
    if relation is not None:
      rel = self._relation(snap, relation)
      if direction not in (None, "forward", "reverse"):
        raise ApiError(400, f"direction must be 'forward' or 'reverse', got {direction!r}")
      direction = direction or ("forward" if entity_type == rel.source else "reverse")
      known = rel.source if direction == "forward" else rel.target
      if entity_type != known:
        raise ApiError(400, f"relation {relation!r} joins {rel.source} -> {rel.target}; "
                       f"{entity_type!r} is not its {'source' if direction == 'forward' else 'target'}")
      target_type = rel.target if direction == "forward" else rel.source
    elif direction is not None:
      raise ApiError(400, "direction needs a relation")
    found = snap.retriever.neighbors(entity_type, row, relation=relation, k=k, exact=exact,
                                     direction=direction)
    return {"entity_type": entity_type, "name": name, "relation": relation,
            "direction": direction, "target_type": target_type, "exact": exact,
            "version_id": snap.version_id,
            "neighbors": [{"rank": i + 1, "name": n.name, "id": n.id, "score": n.score}
                          for i, n in enumerate(found)]}

  def _mixture(self, snap: Snapshot, target_type: str):
    from twhin_jax import mixture as mixture_lib
    with snap.mixtures_lock:
      if target_type not in snap.mixtures:
        try:
          model = mixture_lib.load_mixture(self.workdir, target_type)
        except FileNotFoundError:
          raise ApiError(409, f"no mixture for target type {target_type!r}: run `twhin cluster "
                         f"--workdir <run> --type {target_type}` first") from None
        built_from = model.info.get("checkpoint", {}).get("hash")
        if built_from != snap.checkpoint["hash"]:
          raise ApiError(409, f"the {target_type!r} mixture was built from checkpoint "
                         f"{built_from}, this server serves {snap.checkpoint['hash']}: "
                         f"rerun `twhin cluster --type {target_type}`")
        snap.mixtures[target_type] = model
      return snap.mixtures[target_type]

  def diverse(self, snap: Snapshot, body: dict) -> dict:
    from twhin_jax import mixture as mixture_lib
    _check_fields(body, ("entity_type", "name", "engagements", "target_type", "k", "exact",
                         "exclude", "personal"))
    entity_type = self._type(snap, body)
    target_type = self._type(snap, body, "target_type")
    k = _k(body)
    exact = _field(body, "exact", bool, required=False, default=False)
    name = _field(body, "name", str, required=False)
    engagements = _field(body, "engagements", list, required=False)
    if (name is None) == (engagements is None):
      raise ApiError(400, "give exactly one of 'name' and 'engagements'")
    exclude = _field(body, "exclude", list, required=False, default=[])
    if len(exclude) > MAX_NAMES or any(not isinstance(e, str) for e in exclude):
      raise ApiError(400, f"'exclude' must be at most {MAX_NAMES} {target_type} names (strings)")
    model = self._mixture(snap, target_type)
    if entity_type != model.source_type:
      raise ApiError(400, f"the {target_type!r} mixtures are of {model.source_type!r} "
                     f"entities, not {entity_type!r}")
    # personal (known entities only): clusters set each one's share of k,
    # the entity's own query vector ranks the members (mixture.diverse_search).
    personal = _field(body, "personal", bool, required=False, default=name is not None)
    if personal and name is None:
      raise ApiError(400, "'personal' needs 'name' (an entity with a trained vector)")
    query = None
    if name is not None:
      row = self._row(snap, entity_type, name)
      mix = model.mixture(row)
      if personal:
        query = snap.retriever.query_vectors(model.relations[0], [row]).vectors[0]
    else:
      if not engagements or len(engagements) > MAX_ENGAGEMENTS:
        raise ApiError(400, f"'engagements' needs 1 to {MAX_ENGAGEMENTS} items")
      pairs = []
      for i, pair in enumerate(engagements):
        if (not isinstance(pair, list) or len(pair) != 2
            or not all(isinstance(p, str) for p in pair)):
          raise ApiError(400, f"engagements[{i}] must be [relation, {target_type} name]")
        if pair[0] not in model.relations:
          raise ApiError(400, f"engagements[{i}]: relation {pair[0]!r} is not one of "
                         f"{list(model.relations)}")
        pairs.append((pair[0], self._row(snap, target_type, pair[1])))
      mix = model.mixture_from_engagements(pairs, snap.retriever)
    excluded = [self._row(snap, target_type, e) for e in exclude]
    ids, scores, components = mixture_lib.diverse_search(
        snap.retriever, target_type, mix, k, clustering=model.clustering, exclude=excluded,
        exact=exact, query=query)
    names = snap.retriever.names(target_type)
    return {"entity_type": entity_type, "target_type": target_type,
            "version_id": snap.version_id,
            "mixture": [{"cluster": int(c), "weight": float(w)}
                        for c, w in zip(mix.clusters, mix.weights)],
            "results": [{"rank": i + 1, "name": names[int(t)], "id": int(t), "score": float(s),
                         "cluster": int(mix.clusters[int(c)])}
                        for i, (t, s, c) in enumerate(zip(ids, scores, components))]}

  def score(self, snap: Snapshot, body: dict) -> dict:
    import jax.numpy as jnp
    from twhin_jax.model import apply_operator, compare_pairs
    _check_fields(body, ("triples",))
    triples = _field(body, "triples", list)
    if not triples or len(triples) > MAX_TRIPLES:
      raise ApiError(400, f"'triples' needs 1 to {MAX_TRIPLES} items")
    groups: dict[str, list[tuple[int, int, int]]] = {}
    for i, triple in enumerate(triples):
      if (not isinstance(triple, list) or len(triple) != 3
          or not all(isinstance(x, str) for x in triple)):
        raise ApiError(400, f"triples[{i}] must be [source name, relation, target name] strings")
      source, relation, target = triple
      rel = self._relation(snap, relation)
      groups.setdefault(relation, []).append(
          (i, self._row(snap, rel.source, source), self._row(snap, rel.target, target)))
    scores = np.zeros(len(triples), np.float64)
    r = snap.retriever
    for relation, items in groups.items():
      rel = r.relations[relation]
      where = np.array([i for i, _, _ in items], np.int64)
      # Rows padded to a power of two (at least 16): few distinct shapes to compile.
      padded = max(16, 1 << (len(items) - 1).bit_length())
      source_rows = np.zeros(padded, np.int64)
      target_rows = np.zeros(padded, np.int64)
      source_rows[:len(items)] = [s for _, s, _ in items]
      target_rows[:len(items)] = [t for _, _, t in items]
      sources = np.asarray(r.table(rel.source)[source_rows], np.float32)  # [P, d]
      targets = np.asarray(r.table(rel.target)[target_rows], np.float32)  # [P, d]
      query = apply_operator(rel.operator, jnp.asarray(rel.forward), jnp.asarray(sources))
      scores[where] = np.asarray(compare_pairs(r.comparator, query,
                                               jnp.asarray(targets)))[:len(items)]  # [n]
    return {"comparator": r.comparator, "version_id": snap.version_id,
            "scores": [float(s) for s in scores]}

  def embedding(self, snap: Snapshot, body: dict) -> dict:
    _check_fields(body, ("entity_type", "names"))
    entity_type = self._type(snap, body)
    names = _string_list(body, "names", MAX_NAMES)
    rows = np.array([self._row(snap, entity_type, n) for n in names], np.int64)
    vectors = np.asarray(snap.retriever.table(entity_type)[rows], np.float32)  # [n, d]
    return {"entity_type": entity_type, "dim": int(vectors.shape[1]),
            "version_id": snap.version_id,
            "embeddings": [{"name": n, "vector": v.tolist()} for n, v in zip(names, vectors)]}

  def reload_route(self, body: dict) -> dict:
    _check_fields(body, ("force",))
    force = _field(body, "force", bool, required=False, default=False)
    try:
      return self.reload(force=force)
    except FileNotFoundError as err:
      raise ApiError(409, f"cannot reload: {err}") from None
    except Exception as err:
      raise ApiError(500, f"reload failed, still serving the previous version: "
                     f"{type(err).__name__}: {err}") from None


# ---------------------------------------------------------------------------
# OpenAPI.


def _schema_ref(name: str) -> dict:
  return {"$ref": f"#/components/schemas/{name}"}


def openapi() -> dict:
  """The OpenAPI 3.0 description of every route."""
  string, integer, boolean, number = ({"type": t} for t in ("string", "integer", "boolean",
                                                               "number"))
  k = {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": 10}
  names = {"type": "array", "items": string, "minItems": 1, "maxItems": MAX_NAMES}

  def obj(properties: dict, required=()):
    out = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
      out["required"] = list(required)
    return out

  schemas = {
      "Error": {"type": "object", "properties": {"error": string}, "required": ["error"]},
      "NeighborsRequest": obj({
          "entity_type": string, "name": string,
          "relation": dict(string, description="rank this relation's other end by f(s, r, t); "
                           "absent: same-type neighbours by the comparator"),
          "k": k, "direction": {"type": "string", "enum": ["forward", "reverse"]},
          "exact": dict(boolean, default=False)}, ("entity_type", "name")),
      "Ranked": {"type": "object", "properties": {"rank": integer, "name": string,
                                                  "id": integer, "score": number}},
      "NeighborsResponse": {"type": "object", "properties": {
          "entity_type": string, "name": string, "relation": string, "direction": string,
          "target_type": string, "exact": boolean, "version_id": string,
          "neighbors": {"type": "array", "items": _schema_ref("Ranked")}}},
      "DiverseRequest": obj({
          "entity_type": dict(string, description="the mixtures' source (user) type"),
          "name": string,
          "engagements": {"type": "array", "maxItems": MAX_ENGAGEMENTS, "items": {
              "type": "array", "items": string, "minItems": 2, "maxItems": 2},
              "description": "[relation, target name] pairs (a new user)"},
          "target_type": string, "k": k, "exact": dict(boolean, default=False),
          "exclude": names,
          "personal": dict(boolean, description=(
              "rank each cluster's members by the entity's own query vector (default "
              "with 'name'); false: by the cluster's vector"))}, ("entity_type", "target_type")),
      "DiverseResponse": {"type": "object", "properties": {
          "entity_type": string, "target_type": string, "version_id": string,
          "mixture": {"type": "array", "items": {"type": "object", "properties": {
              "cluster": integer, "weight": number}}},
          "results": {"type": "array", "items": _schema_ref("Ranked")}}},
      "ScoreRequest": obj({"triples": {
          "type": "array", "minItems": 1, "maxItems": MAX_TRIPLES,
          "items": {"type": "array", "items": string, "minItems": 3, "maxItems": 3},
          "description": "[source name, relation, target name]"}}, ("triples",)),
      "ScoreResponse": {"type": "object", "properties": {
          "comparator": string, "version_id": string,
          "scores": {"type": "array", "items": number}}},
      "EmbeddingRequest": obj({"entity_type": string, "names": names},
                              ("entity_type", "names")),
      "EmbeddingResponse": {"type": "object", "properties": {
          "entity_type": string, "dim": integer, "version_id": string,
          "embeddings": {"type": "array", "items": {"type": "object", "properties": {
              "name": string, "vector": {"type": "array", "items": number}}}}}},
      "ReloadRequest": obj({"force": dict(boolean, default=False)}),
      "ReloadResponse": {"type": "object", "properties": {
          "reloaded": boolean, "version_id": string, "checkpoint": {"type": "object"},
          "previous": {"type": "object"}, "load_seconds": number}},
      "Health": {"type": "object", "properties": {
          "status": string, "version_id": string, "checkpoint": {"type": "object"},
          "loaded_at": string, "started_at": string, "counts": {"type": "object"},
          "indexes": {"type": "object"}, "requests": integer, "errors": integer,
          "reloads": integer, "last_reload_error": {"type": "string", "nullable": True}}},
      "Version": {"type": "object", "properties": {
          "version_id": string, "parent_id": {"type": "string", "nullable": True},
          "graph_manifest_hash": string, "config_hash": string, "created": string,
          "checkpoint": {"type": "object"}, "comparator": string, "reciprocal": boolean,
          "relations": {"type": "array", "items": {"type": "object"}}}},
  }
  errors = {str(code): {"description": text, "content": {
      "application/json": {"schema": _schema_ref("Error")}}}
            for code, text in ((400, "malformed request"), (404, "unknown entity name"),
                               (409, "state conflict (no mixture, no checkpoint)"),
                               (413, "body too large"))}

  def get(summary: str, schema: str) -> dict:
    return {"get": {"summary": summary, "responses": {"200": {
        "description": "OK", "content": {"application/json": {"schema": _schema_ref(schema)}}}}}}

  def post(summary: str, request: str, response: str) -> dict:
    return {"post": {"summary": summary, "requestBody": {"required": True, "content": {
        "application/json": {"schema": _schema_ref(request)}}},
        "responses": dict({"200": {"description": "OK", "content": {
            "application/json": {"schema": _schema_ref(response)}}}}, **errors)}}

  return {
      "openapi": "3.0.3",
      "info": {"title": "twhin-jax service", "version": API_VERSION,
               "description": "Neighbours, diverse retrieval, scores and embeddings of one "
                              "trained TwHIN run; f(s, r, t) = compare(op_r(theta_s), theta_t)."},
      "paths": {
          "/health": get("status, version, load time, counts, request totals", "Health"),
          "/version": get("lineage of the served checkpoint", "Version"),
          "/openapi.json": {"get": {"summary": "this document",
                                    "responses": {"200": {"description": "OK"}}}},
          "/neighbors": post("ranked targets of a relation (or same-type neighbours)",
                             "NeighborsRequest", "NeighborsResponse"),
          "/diverse": post("diverse retrieval from a user's mixture (needs `twhin cluster`)",
                           "DiverseRequest", "DiverseResponse"),
          "/score": post("the model's score of each triple", "ScoreRequest", "ScoreResponse"),
          "/embedding": post("embedding vectors by name", "EmbeddingRequest",
                             "EmbeddingResponse"),
          "/reload": post("switch to the run's latest checkpoint without dropping requests",
                          "ReloadRequest", "ReloadResponse"),
      },
      "components": {"schemas": schemas},
  }


# ---------------------------------------------------------------------------
# HTTP.


class Handler(http.server.BaseHTTPRequestHandler):
  """JSON over HTTP/1.1 (keep-alive); the routes are ``Service`` methods."""

  protocol_version = "HTTP/1.1"
  # Headers and body go out in two writes; with Nagle on, the body waits for
  # the client's delayed ACK (40 ms per request on Linux).
  disable_nagle_algorithm = True
  server_version = "twhin-serve/" + API_VERSION
  service: Service  # set on the subclass made by make_server
  max_body: int = MAX_BODY

  def log_message(self, format, *args):  # noqa: A002 - the base class's name
    log.debug("%s " + format, self.address_string(), *args)

  def _send(self, status: int, document: Any) -> None:
    payload = json.dumps(document).encode()
    self.send_response(status)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(payload)))
    if self.close_connection:
      self.send_header("Connection", "close")
    self.end_headers()
    self.wfile.write(payload)

  def _body(self) -> dict:
    length = self.headers.get("Content-Length")
    if self.headers.get("Transfer-Encoding"):
      self.close_connection = True
      raise ApiError(411, "chunked bodies are not accepted; send Content-Length")
    if length is None:
      self.close_connection = True
      raise ApiError(411, "Content-Length required")
    try:
      length = int(length)
    except ValueError:
      self.close_connection = True
      raise ApiError(400, f"bad Content-Length {length!r}") from None
    if length < 0 or length > self.max_body:
      self.close_connection = True  # the body is not read
      raise ApiError(413, f"body of {length} bytes exceeds the limit of {self.max_body}")
    raw = self.rfile.read(length)
    try:
      body = json.loads(raw.decode("utf-8")) if raw else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
      raise ApiError(400, f"malformed JSON: {err}") from None
    if not isinstance(body, dict):
      raise ApiError(400, f"the body must be a JSON object, got {type(body).__name__}")
    return body

  def _dispatch(self, method: str) -> None:
    service = self.service
    snap = service.snapshot  # one reference for the whole request
    path = self.path.split("?", 1)[0]
    status, document = 200, None
    try:
      if method == "GET":
        routes = {"/health": lambda: service.health(snap),
                  "/version": lambda: service.version(snap),
                  "/openapi.json": openapi}
        if path not in routes:
          raise ApiError(405 if path in _POST_ROUTES else 404, f"no route GET {path}")
        document = routes[path]()
      else:
        if path not in _POST_ROUTES:
          raise ApiError(405 if path in _GET_ROUTES else 404, f"no route POST {path}")
        body = self._body()
        if path == "/reload":
          document = service.reload_route(body)
        else:
          document = getattr(service, _POST_ROUTES[path])(snap, body)
    except ApiError as err:
      status, document = err.status, {"error": err.message}
    except Exception as err:  # a bug: answer, log, keep serving
      log.exception("error serving %s %s", method, path)
      status, document = 500, {"error": f"internal error: {type(err).__name__}: {err}"}
    service.count(status >= 400)
    self._send(status, document)

  def do_GET(self):  # noqa: N802 - the base class's naming
    self._dispatch("GET")

  def do_POST(self):  # noqa: N802
    self._dispatch("POST")


_GET_ROUTES = ("/health", "/version", "/openapi.json")
_POST_ROUTES = {"/neighbors": "neighbors", "/diverse": "diverse", "/score": "score",
                "/embedding": "embedding", "/reload": "reload"}


class Server(http.server.ThreadingHTTPServer):
  daemon_threads = True
  allow_reuse_address = True
  request_queue_size = 128


def make_server(service: Service, host: str = "127.0.0.1", port: int = 8080,
                max_body: int = MAX_BODY) -> Server:
  """A bound (not yet serving) server; ``port=0`` picks a free port
  (``server.server_address[1]``)."""
  handler = type("BoundHandler", (Handler,), {"service": service, "max_body": int(max_body)})
  return Server((host, port), handler)


def serve(workdir: str, host: str = "127.0.0.1", port: int = 8080, *,
          watch: float = 0.0, max_body: int = MAX_BODY,
          exact_below: int = retrieval.EXACT_BELOW, progress: bool = True) -> None:
  """Loads the run and serves until interrupted (the ``twhin serve`` command)."""
  service = Service(workdir, exact_below=exact_below, progress=progress)
  if watch > 0:
    service.watch(watch)
  server = make_server(service, host, port, max_body)
  log.warning("serving %s (version %s, step %s) on http://%s:%d", workdir,
              service.snapshot.version_id, service.snapshot.checkpoint["step"],
              *server.server_address[:2])
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    service.close()
    server.server_close()
