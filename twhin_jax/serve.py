"""An HTTP JSON API over one trained run: neighbours, diverse retrieval,
scores, embeddings, and hot reload of newer checkpoints.

    twhin serve --workdir DIR [--port 8080] [--host 127.0.0.1] [--watch SECONDS]

Routes (the OpenAPI document is at ``GET /openapi.json``, the interactive
page at ``GET /docs``)::

  GET  /health      status, version id, checkpoint, loaded-at, counts, requests
  GET  /version     lineage of the loaded checkpoint (version, parent, hashes, created)
  POST /neighbors   {entity_type, name, relation?, k?, direction?, exact?}
  POST /diverse     {entity_type, name | engagements, target_type, k?, exact?, exclude?}
  POST /score       {triples: [[source, relation, target], ...]}
  POST /embedding   {entity_type, names: [...]}
  POST /reload      {force?}: switch to the run's latest checkpoint

Scores are the model's f(s, r, t) = compare(op_r(theta_s), theta_t) (model.py
eq. 1); neighbours come from ``retrieval.Retriever`` (ScaNN or exact).

Stack. FastAPI on uvicorn (httptools parser, uvloop event loop): the
request and response models (serve_models.py) are the validation and the
OpenAPI document; the ``/docs`` page's scripts are served from the
fastapi-offline package, so it works without a CDN. One process with one
copy of the tables and one snapshot to swap (worker processes would each
load their own and need their own reload). In it, ``loops`` event-loop
threads (one per core by default) accept on one socket; the bounded routes
run on their loop without a thread hop (measured: a hop to a thread pool
cost more than a search), so the loops overlap where the work releases the
GIL (ScaNN, XLA). /reload and /diverse, which can take long, run in a
thread pool.

Versions without dropped requests. Everything a request needs (the
Retriever with its tables, vocabulary readers, searchers and relation parameters, and the
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
is a path or code. Bodies need a Content-Length and are limited (``max_body``
bytes, 1 MiB by default; a larger one is refused before it is read), as are
k (1..1000), names, triples and engagements per request, and JSON nesting
(too deep is a 400, not a RecursionError). A client has ``request_timeout``
seconds to send a whole request and ``keep_alive_timeout`` seconds of
silence between requests; then its connection is closed (a slow client
cannot hold a connection, and never holds a thread). Errors are JSON
``{"error": message}`` with a 4xx status (5xx only for bugs).
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import datetime
import functools
import gc
import importlib.util
import json
import logging
import os
import socket
import threading
import time

import anyio.to_thread
import fastapi
import fastapi_offline
import jax
import numpy as np
import uvicorn
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from twhin_jax import checkpoint as checkpoint_lib
from twhin_jax import mixture as mixture_lib
from twhin_jax import retrieval
from twhin_jax import serve_models as models
from twhin_jax.model import apply_operator, compare_pairs
from twhin_jax.serve_models import MAX_ENGAGEMENTS, MAX_K, MAX_NAMES, MAX_TRIPLES  # noqa: F401

log = logging.getLogger(__name__)

API_VERSION = "1"
MAX_BODY = 1 << 20
REQUEST_TIMEOUT = 10.0  # seconds to receive one whole request (headers and body)
KEEP_ALIVE_TIMEOUT = 5  # seconds of silence before an idle keep-alive connection is closed
MAX_HEADER_BYTES = 64 * 1024
#: Seconds after a reload before the old snapshot's memory is returned (Service._return_freed_memory).
RELEASE_AFTER_SECONDS = 3.0
# Event-loop threads (see HttpServer): one per core, at most 8; the
# environment variable TWHIN_SERVE_LOOPS overrides it.
LOOPS = int(os.environ.get("TWHIN_SERVE_LOOPS", min(8, os.cpu_count() or 1)))


class ApiError(Exception):
  """A request error: HTTP status and a message for the client."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status
    self.message = message


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
  and warms every table, vocabulary reader and searcher, so that no request of the
  new snapshot compiles the exact search for one query; a name lookup reads only
  the vocabulary row groups it needs (a few kept decoded)."""
  started = time.perf_counter()
  retriever = retrieval.Retriever.open(workdir, exact_below=exact_below, progress=progress)
  step = retriever.run["checkpoint"]["step"]
  meta = checkpoint_lib.read_meta(
      os.path.join(checkpoint_lib.checkpoint_root(workdir), str(step)))
  for entity_type in retriever.entity_types:
    table = retriever.table(entity_type)
    if len(table):  # opens the on-disk vocabulary and reads its first row groups
      retriever.lookup(entity_type, retriever.names_of(entity_type, [0])[0])
    probe = np.asarray(table[:1], np.float32)
    for k in (10, 11):  # the default k (and k + 1 of same-type neighbours): jit compiled now
      retriever.search(entity_type, probe, k, exact=True)
      retriever.search(entity_type, probe, k, exact=False)
  for rel in retriever.relations.values():
    retriever.neighbors(rel.source, 0, relation=rel.name, k=10, direction="forward")
    rows = np.zeros((16, retriever.table(rel.source).shape[1]), np.float32)
    _pair_scorer(rel.operator, retriever.comparator)(rel.forward, rows, rows)  # /score's jit
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

  @staticmethod
  def _return_freed_memory() -> None:
    """Collects the old snapshot and hands glibc's freed heap back to the OS.

    Without it the server's RSS stepped up by the size of one snapshot at
    every reload (538 -> 612 MB on the demo run) and levelled off only after
    three reloads: glibc keeps freed arenas for reuse. Run a few seconds after
    the swap, when requests that still held the old snapshot have finished."""
    gc.collect()
    try:
      ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
      pass

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
      threading.Timer(RELEASE_AFTER_SECONDS, self._return_freed_memory).start()
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

  def _type(self, snap: Snapshot, value: str) -> str:
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

  def neighbors(self, snap: Snapshot, request: models.NeighborsRequest) -> dict:
    entity_type = self._type(snap, request.entity_type)
    name, relation, direction = request.name, request.relation, request.direction
    row = self._row(snap, entity_type, name)
    target_type = entity_type
    if relation is not None:
      rel = self._relation(snap, relation)
      direction = direction or ("forward" if entity_type == rel.source else "reverse")
      known = rel.source if direction == "forward" else rel.target
      if entity_type != known:
        raise ApiError(400, f"relation {relation!r} joins {rel.source} -> {rel.target}; "
                       f"{entity_type!r} is not its {'source' if direction == 'forward' else 'target'}")
      target_type = rel.target if direction == "forward" else rel.source
    found = snap.retriever.neighbors(entity_type, row, relation=relation, k=request.k,
                                     exact=request.exact, direction=direction)
    return {"entity_type": entity_type, "name": name, "relation": relation,
            "direction": direction, "target_type": target_type, "exact": request.exact,
            "version_id": snap.version_id,
            "neighbors": [{"rank": i + 1, "name": n.name, "id": n.id, "score": n.score}
                          for i, n in enumerate(found)]}

  def _mixture(self, snap: Snapshot, target_type: str):
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

  def diverse(self, snap: Snapshot, request: models.DiverseRequest) -> dict:
    entity_type = self._type(snap, request.entity_type)
    target_type = self._type(snap, request.target_type)
    name = request.name
    model = self._mixture(snap, target_type)
    if entity_type != model.source_type:
      raise ApiError(400, f"the {target_type!r} mixtures are of {model.source_type!r} "
                     f"entities, not {entity_type!r}")
    # personal (known entities only): clusters set each one's share of k,
    # the entity's own query vector ranks the members (mixture.diverse_search).
    personal = request.personal if request.personal is not None else name is not None
    query = None
    if name is not None:
      row = self._row(snap, entity_type, name)
      mix = model.mixture(row)
      if personal:
        query = snap.retriever.query_vectors(model.relations[0], [row]).vectors[0]
    else:
      pairs = []
      for i, (relation, target) in enumerate(request.engagements):
        if relation not in model.relations:
          raise ApiError(400, f"engagements[{i}]: relation {relation!r} is not one of "
                         f"{list(model.relations)}")
        pairs.append((relation, self._row(snap, target_type, target)))
      mix = model.mixture_from_engagements(pairs, snap.retriever)
    excluded = [self._row(snap, target_type, e) for e in request.exclude]
    ids, scores, components = mixture_lib.diverse_search(
        snap.retriever, target_type, mix, request.k, clustering=model.clustering,
        exclude=excluded, exact=request.exact, query=query)
    names = snap.retriever.names_of(target_type, ids)
    return {"entity_type": entity_type, "target_type": target_type,
            "version_id": snap.version_id,
            "mixture": [{"cluster": int(c), "weight": float(w)}
                        for c, w in zip(mix.clusters, mix.weights)],
            "results": [{"rank": i + 1, "name": name, "id": int(t), "score": float(s),
                         "cluster": int(mix.clusters[int(c)])}
                        for i, (t, s, c, name) in enumerate(zip(ids, scores, components, names))]}

  def score(self, snap: Snapshot, request: models.ScoreRequest) -> dict:
    triples = request.triples
    groups: dict[str, list[tuple[int, int, int]]] = {}
    for i, (source, relation, target) in enumerate(triples):
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
      scorer = _pair_scorer(rel.operator, r.comparator)
      scores[where] = np.asarray(scorer(rel.forward, sources, targets))[:len(items)]  # [n]
    return {"comparator": r.comparator, "version_id": snap.version_id,
            "scores": scores.tolist()}

  def embedding(self, snap: Snapshot, request: models.EmbeddingRequest) -> dict:
    entity_type = self._type(snap, request.entity_type)
    names = request.names
    rows = np.array([self._row(snap, entity_type, n) for n in names], np.int64)
    vectors = np.asarray(snap.retriever.table(entity_type)[rows], np.float32)  # [n, d]
    return {"entity_type": entity_type, "dim": int(vectors.shape[1]),
            "version_id": snap.version_id,
            "embeddings": [{"name": n, "vector": v} for n, v in zip(names, vectors.tolist())]}

  def reload_route(self, request: models.ReloadRequest) -> dict:
    try:
      return self.reload(force=request.force)
    except FileNotFoundError as err:
      raise ApiError(409, f"cannot reload: {err}") from None
    except Exception as err:
      raise ApiError(500, f"reload failed, still serving the previous version: "
                     f"{type(err).__name__}: {err}") from None


@functools.lru_cache(maxsize=None)
def _pair_scorer(operator: str, comparator: str):
  """f(s, r, t) = compare(op_r(theta_s), theta_t) (model.py eq. 1) for rows
  [P, d] of sources and targets, as one jitted call: the same functions the
  trainer uses, one dispatch per relation group instead of one per op."""
  return jax.jit(lambda param, sources, targets: compare_pairs(
      comparator, apply_operator(operator, param, sources), targets))


# ---------------------------------------------------------------------------
# The application (FastAPI): routes, error format, body rules.

GET_ROUTES = ("/health", "/version", "/openapi.json", "/docs")
POST_ROUTES = ("/neighbors", "/diverse", "/score", "/embedding", "/reload")

_ERRORS = {
    400: "malformed request (bad JSON, wrong type, unknown field, unknown type or relation)",
    404: "unknown entity name",
    409: "state conflict (no mixture, no checkpoint)",
    411: "no Content-Length (chunked bodies are refused)",
    413: "body larger than the limit",
}


def _error_responses(*codes: int) -> dict:
  return {code: {"model": models.Error, "description": _ERRORS[code]} for code in codes}


def _json_error(status: int, message: str, headers: dict | None = None):
  return JSONResponse({"error": message}, status_code=status, headers=headers)


def _describe_validation(errors) -> str:
  """One line per pydantic error, naming the field: ``field 'k': Input
  should be less than or equal to 1000``; the input itself is not echoed."""
  lines = []
  for error in errors[:5]:
    loc = [str(part) for part in error.get("loc", ()) if part != "body"]
    where = ".".join(loc)
    kind, message = error.get("type", ""), str(error.get("msg", ""))
    message = message.removeprefix("Value error, ")
    if kind == "json_invalid":
      lines.append(f"malformed JSON: {error.get('ctx', {}).get('error', message)} "
                   f"at character {loc[-1] if loc else '?'}")
    elif kind == "missing":
      lines.append(f"missing field {where!r}" if where else "missing request body (a JSON object)")
    elif kind == "extra_forbidden":
      lines.append(f"unknown field {where!r}")
    elif kind in ("model_type", "model_attributes_type", "dict_type") and not loc:
      lines.append("the body must be a JSON object")
    elif where:
      lines.append(f"field {where!r}: {message}")
    else:
      lines.append(message)
  if len(errors) > 5:
    lines.append(f"and {len(errors) - 5} more")
  return "; ".join(lines)


class _BodyRules:
  """ASGI middleware in front of the app: counts every answer for /health,
  and applies the body rules of the POST routes before a byte of the body
  is read (411 without Content-Length or with a chunked body, 413 over
  ``max_body``). The body is JSON whatever its Content-Type says, as in the
  first version of this server (``curl -d`` sends form-urlencoded)."""

  def __init__(self, app, service: Service, max_body: int):
    self.app = app
    self.service = service
    self.max_body = max_body

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    service = self.service

    async def counting_send(message):
      if message["type"] == "http.response.start":
        service.count(message["status"] >= 400)
      await send(message)

    if scope["method"] == "POST" and scope["path"] in POST_ROUTES:
      length = chunked = None
      headers = []
      for name, value in scope["headers"]:
        if name == b"content-length":
          length = value
        elif name == b"transfer-encoding":
          chunked = value
        if name != b"content-type":
          headers.append((name, value))
      problem = None
      if chunked is not None:
        problem = 411, "chunked bodies are not accepted; send Content-Length"
      elif length is None:
        problem = 411, "Content-Length required"
      else:
        try:
          size = int(length)
        except ValueError:
          problem = 400, f"bad Content-Length {length.decode('latin-1')!r}"
        else:
          if size < 0 or size > self.max_body:
            problem = 413, f"body of {size} bytes exceeds the limit of {self.max_body}"
      if problem is not None:  # the body is not read: close the connection after answering
        response = _json_error(*problem, headers={"Connection": "close"})
        return await response(scope, receive, counting_send)
      headers.append((b"content-type", b"application/json"))
      scope = dict(scope, headers=headers)
    await self.app(scope, receive, counting_send)


@dataclasses.dataclass(frozen=True)
class SnapshotRoute:
  """A route answered by ``Service.<name>(snapshot[, request])``: the
  snapshot is read once per request; ``request`` is the validated body of a
  POST route (absent for a GET)."""
  method: str  # "get" or "post"
  name: str  # the path is /<name>; the Service method and the OpenAPI name
  response: type
  summary: str
  request: type | None = None
  errors: tuple[int, ...] = ()  # the 4xx answers the OpenAPI document lists
  on_loop: bool = True  # False: may take long, runs in the thread pool


SNAPSHOT_ROUTES = (
    SnapshotRoute("get", "health", models.Health,
                  "status, version, load time, counts, request totals"),
    SnapshotRoute("get", "version", models.Version, "lineage of the served checkpoint"),
    SnapshotRoute("post", "neighbors", models.NeighborsResponse,
                  "ranked targets of a relation (or same-type neighbours)",
                  models.NeighborsRequest, (400, 404, 411, 413)),
    SnapshotRoute("post", "diverse", models.DiverseResponse,
                  "diverse retrieval from a user's mixture (needs `twhin cluster`)",
                  models.DiverseRequest, (400, 404, 409, 411, 413), on_loop=False),
    SnapshotRoute("post", "score", models.ScoreResponse, "the model's score of each triple",
                  models.ScoreRequest, (400, 404, 411, 413)),
    SnapshotRoute("post", "embedding", models.EmbeddingResponse, "embedding vectors by name",
                  models.EmbeddingRequest, (400, 404, 411, 413)),
)


def _add_snapshot_route(app, service: Service, route: SnapshotRoute, on_loop) -> None:
  """Registers ``route`` on ``app``; FastAPI reads the body model from the
  handler's ``request`` annotation, and the OpenAPI names from its name."""
  answer = getattr(service, route.name)
  if route.request is None:
    def handler():
      return answer(service.snapshot)
  else:
    def handler(request):
      return answer(service.snapshot, request)
    handler.__annotations__ = {"request": route.request}
  handler.__name__ = handler.__qualname__ = route.name
  if route.on_loop:
    handler = on_loop(handler)
  options = {"responses": _error_responses(*route.errors)} if route.errors else {}
  getattr(app, route.method)(f"/{route.name}", response_model=route.response,
                             summary=route.summary, **options)(handler)


def make_app(service: Service, max_body: int = MAX_BODY, inline: bool = True):
  """The FastAPI application over ``service`` (wrapped in the body rules).
  ``inline=False`` runs every route in the thread pool instead of on the
  event loop (slower here; kept for routes that may block)."""
  app = fastapi_offline.FastAPIOffline(
      title="twhin-jax service", version=API_VERSION, redoc_url=None,
      static_url="/docs-static", openapi_url="/openapi.json",
      description="Neighbours, diverse retrieval, scores and embeddings of one trained TwHIN "
                  "run; f(s, r, t) = compare(op_r(theta_s), theta_t). Errors are JSON "
                  "`{\"error\": message}`.")

  @app.exception_handler(ApiError)
  async def api_error(request, err: ApiError):
    return _json_error(err.status, err.message)

  @app.exception_handler(RequestValidationError)
  async def validation_error(request, err: RequestValidationError):
    return _json_error(400, _describe_validation(err.errors()))

  @app.exception_handler(StarletteHTTPException)
  async def http_error(request, err: StarletteHTTPException):
    method, path = request.method, request.url.path
    if err.status_code == 404 and err.detail == "Not Found":
      message = f"no route {method} {path}; routes: GET {', '.join(GET_ROUTES)}; POST " \
                f"{', '.join(POST_ROUTES)}"
    elif err.status_code == 405:
      allowed = (err.headers or {}).get("Allow", "")
      message = f"no route {method} {path}; it allows {allowed}"
    elif err.status_code == 400 and isinstance(err.__cause__, RecursionError):
      message = "malformed JSON: nested too deeply"
    elif err.status_code == 400 and err.__cause__ is not None:
      message = f"malformed body: {type(err.__cause__).__name__}: {err.__cause__}"
    else:
      message = str(err.detail)
    return _json_error(err.status_code, message, headers=err.headers)

  @app.exception_handler(Exception)
  async def internal_error(request, err: Exception):  # a bug: answer, log, keep serving
    log.error("error serving %s %s", request.method, request.url.path, exc_info=err)
    return _json_error(500, f"internal error: {type(err).__name__}: {err}")

  def on_loop(route):
    """``route`` as a coroutine (runs on the event loop) or, with
    ``inline=False``, as is (runs in the thread pool)."""
    if not inline:
      return route

    @functools.wraps(route)
    async def coroutine(*args, **kwargs):
      return route(*args, **kwargs)

    return coroutine

  # Routes. Each reads `service.snapshot` once. The bounded ones (a lookup,
  # one search, a few small jitted ops) run on the event loop: measured here,
  # a hop to the thread pool and back costs more than the search itself.
  # The two that can take long (a reload builds a snapshot; /diverse may
  # read a mixture from disk) are plain `def`: FastAPI runs them in its
  # thread pool, and the event loop keeps answering.

  for route in SNAPSHOT_ROUTES:
    _add_snapshot_route(app, service, route, on_loop)

  @app.post("/reload", response_model=models.ReloadResponse,
            responses=_error_responses(400, 409, 411, 413),
            summary="switch to the run's latest checkpoint without dropping requests")
  def reload(request: models.ReloadRequest | None = fastapi.Body(None)):
    return service.reload_route(request or models.ReloadRequest())

  def openapi() -> dict:
    """FastAPI's document, less its 422 answers: validation errors are 400 here."""
    if app.openapi_schema is None:
      document = get_openapi(title=app.title, version=app.version,
                             description=app.description, routes=app.routes)
      for item in document["paths"].values():
        for operation in item.values():
          operation["responses"].pop("422", None)
      schemas = document.get("components", {}).get("schemas", {})
      for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
      app.openapi_schema = document
    return app.openapi_schema

  app.openapi = openapi
  return _BodyRules(app, service, max_body)


# ---------------------------------------------------------------------------
# HTTP (uvicorn).


def _timed_protocol(request_timeout: float, max_header_bytes: int, count=lambda error: None):
  """uvicorn's httptools protocol with a deadline on receiving each request.

  uvicorn times out only idle keep-alive connections between requests
  (``timeout_keep_alive``); a client that connects and sends nothing, or
  sends headers or a body a byte at a time, is never cut off. Here the
  deadline is armed when the connection opens and when a request begins,
  and cleared when the request has arrived in full; when it fires before
  any answer has started, the client gets a 408 and the connection is
  closed. Headers are limited to ``max_header_bytes`` (431). ``count(True)``
  records each such refusal (the app never sees these requests)."""
  class TimedHttpToolsProtocol(HttpToolsProtocol):

    def connection_made(self, transport):
      self._request_deadline = None
      self._header_bytes = 0
      self._in_headers = False  # True from a request's first byte to its last header
      super().connection_made(transport)
      self._arm_request_deadline()

    def connection_lost(self, exc):
      self._cancel_request_deadline()
      super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
      super().data_received(data)
      if self._in_headers and not self.transport.is_closing():
        # Still in the headers after this chunk: all of it was header bytes.
        self._header_bytes += len(data)
        if self._header_bytes > max_header_bytes:
          self._refuse(431, f"request headers over {max_header_bytes} bytes")

    def on_message_begin(self) -> None:
      super().on_message_begin()
      self._in_headers = True
      self._header_bytes = 0
      if self._request_deadline is None:
        self._arm_request_deadline()

    def on_headers_complete(self) -> None:
      self._in_headers = False
      super().on_headers_complete()

    def on_message_complete(self) -> None:
      self._cancel_request_deadline()
      super().on_message_complete()

    def _arm_request_deadline(self):
      self._request_deadline = self.loop.call_later(request_timeout, self._request_timed_out)

    def _cancel_request_deadline(self):
      if self._request_deadline is not None:
        self._request_deadline.cancel()
        self._request_deadline = None

    def _request_timed_out(self):
      self._request_deadline = None
      if self.transport.is_closing():
        return
      cycle = self.cycle
      if cycle is not None and cycle.response_started and not cycle.response_complete:
        # A pipelined request is late while the previous answer is being
        # written: never cut into an answer; look again later.
        self._arm_request_deadline()
        return
      self._refuse(408, f"request not received within {request_timeout:g} s")

    def _refuse(self, status: int, message: str):
      self._cancel_request_deadline()
      reason = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[status]
      payload = json.dumps({"error": message}).encode()
      self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n"
                           b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                           % (status, reason, len(payload), payload))
      self.transport.close()
      count(True)

  return TimedHttpToolsProtocol


class HttpServer:
  """The service on uvicorn, bound at construction (``port=0`` picks a free
  port: ``server_address[1]``). ``serve_forever()`` blocks until
  ``shutdown()`` (from another thread) or Ctrl-C.

  ``loops`` event loops, each in its own thread with its own uvicorn server,
  accept on the one listening socket. A loop runs its requests' bounded work
  itself (no thread hop), so several loops let searches overlap where they
  release the GIL (ScaNN, XLA) and keep the server's share of a busy
  machine's cores; all share one ``Service``, so a reload is still one swap.
  """

  def __init__(self, service: Service, host: str = "127.0.0.1", port: int = 8080, *,
               max_body: int = MAX_BODY, request_timeout: float = REQUEST_TIMEOUT,
               keep_alive_timeout: float = KEEP_ALIVE_TIMEOUT,
               max_header_bytes: int = MAX_HEADER_BYTES, backlog: int = 1024,
               loops: int = LOOPS, thread_pool: int = 8):
    self.service = service
    self.app = make_app(service, max_body)
    protocol = _timed_protocol(float(request_timeout), int(max_header_bytes), service.count)
    self.thread_pool = thread_pool
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    self.servers = [uvicorn.Server(uvicorn.Config(
        self.app, loop=loop, http=protocol, ws="none", lifespan="off",
        interface="asgi3", timeout_keep_alive=keep_alive_timeout, backlog=backlog,
        access_log=False, log_config=None, server_header=False,
        timeout_graceful_shutdown=5)) for _ in range(max(1, int(loops)))]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    self.socket = socket.socket(family, socket.SOCK_STREAM)
    self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    self.socket.bind((host, port))
    self.socket.listen(backlog)
    self.server_address = self.socket.getsockname()
    self._stopped = threading.Event()

  def _run(self, server) -> None:
    async def main():
      # The pool that /reload and /diverse run in (anyio's default is 40 threads).
      anyio.to_thread.current_default_thread_limiter().total_tokens = self.thread_pool
      await server.serve(sockets=[self.socket])

    with asyncio.Runner(loop_factory=server.config.get_loop_factory()) as runner:
      runner.run(main())

  def serve_forever(self) -> None:
    threads = [threading.Thread(target=self._run, args=(server,), daemon=True,
                                name=f"twhin-serve-loop-{i}")
               for i, server in enumerate(self.servers[1:], 1)]
    for thread in threads:
      thread.start()
    try:
      self._run(self.servers[0])  # in the calling thread: uvicorn handles Ctrl-C there
    finally:
      for server in self.servers:
        server.should_exit = True
      for thread in threads:
        thread.join(timeout=30)
      self._stopped.set()

  def shutdown(self, timeout: float = 30.0) -> None:
    for server in self.servers:
      server.should_exit = True
    self._stopped.wait(timeout)

  def server_close(self) -> None:
    self.socket.close()


def make_server(service: Service, host: str = "127.0.0.1", port: int = 8080,
                max_body: int = MAX_BODY, **options) -> HttpServer:
  """A bound (not yet serving) server; ``port=0`` picks a free port
  (``server.server_address[1]``). ``options``: see ``HttpServer``."""
  return HttpServer(service, host, port, max_body=max_body, **options)


def serve(workdir: str, host: str = "127.0.0.1", port: int = 8080, *,
          watch: float = 0.0, max_body: int = MAX_BODY,
          exact_below: int = retrieval.EXACT_BELOW, progress: bool = True,
          request_timeout: float = REQUEST_TIMEOUT,
          keep_alive_timeout: float = KEEP_ALIVE_TIMEOUT) -> None:
  """Loads the run and serves until interrupted (the ``twhin serve`` command)."""
  service = Service(workdir, exact_below=exact_below, progress=progress)
  if watch > 0:
    service.watch(watch)
  server = make_server(service, host, port, max_body, request_timeout=request_timeout,
                       keep_alive_timeout=keep_alive_timeout)
  log.warning("serving %s (version %s, step %s) on http://%s:%d (docs at /docs)", workdir,
              service.snapshot.version_id, service.snapshot.checkpoint["step"],
              *server.server_address[:2])
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    service.close()
    server.server_close()
