"""The HTTP service: every route, equality with the library, bad requests,
the OpenAPI document, and hot reload under load with zero errors."""

from __future__ import annotations

import http.client
import json
import threading
import time

import jax.numpy as jnp
import numpy as np
import pytest

from twhin_jax import mixture
from twhin_jax import model
from twhin_jax import retrieval
from twhin_jax import serve
from twhin_jax import train as train_lib

from conftest import train_tiny_demo


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("serve_demo"))
  return train_tiny_demo(workdir)


@pytest.fixture(scope="module")
def server(run_dir):
  # exact_below=500: users (600) and tweets (2000) get ScaNN indexes.
  service = serve.Service(run_dir, exact_below=500)
  httpd = serve.make_server(service, "127.0.0.1", 0, max_body=64 * 1024)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield httpd
  httpd.shutdown()
  httpd.server_close()
  service.close()


def call(server, method, path, body=None, *, raw=None, headers=None):
  """(status, decoded JSON) of one request on a fresh connection."""
  connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
  payload = raw if raw is not None else (None if body is None else json.dumps(body).encode())
  connection.request(method, path, body=payload, headers=headers or {})
  response = connection.getresponse()
  data = response.read()
  connection.close()
  return response.status, json.loads(data)


def test_health_version_and_openapi(server, run_dir):
  status, health = call(server, "GET", "/health")
  assert status == 200 and health["status"] == "ok"
  identity = retrieval.checkpoint_identity(run_dir)
  assert health["checkpoint"]["hash"] == identity["hash"]
  assert health["counts"]["entities"]["user"] == 600
  assert health["counts"]["relations"] == 7
  assert health["indexes"]["tweet"] == "scann"
  status, version = call(server, "GET", "/version")
  lineage = json.load(open(identity["meta_path"]))["lineage"]
  assert status == 200
  for key in ("version_id", "parent_id", "graph_manifest_hash", "config_hash", "created"):
    assert version[key] == lineage[key]
  assert version["version_id"] == health["version_id"]
  status, document = call(server, "GET", "/openapi.json")
  assert status == 200 and document["openapi"].startswith("3.")
  assert set(document["paths"]) == {"/health", "/version", "/neighbors", "/diverse", "/score",
                                    "/embedding", "/reload"}
  # The schemas are the request models: closed, strict bounds, no 422 (errors are 400).
  neighbors_request = document["components"]["schemas"]["NeighborsRequest"]
  assert neighbors_request["additionalProperties"] is False
  assert neighbors_request["properties"]["k"]["maximum"] == serve.MAX_K
  assert set(neighbors_request["required"]) == {"entity_type", "name"}
  assert "422" not in json.dumps(document["paths"])
  assert "400" in document["paths"]["/neighbors"]["post"]["responses"]
  for path, item in document["paths"].items():
    for operation in item.values():
      for response in operation["responses"].values():
        ref = response.get("content", {}).get("application/json", {}).get("schema", {})
        if "$ref" in ref:
          assert ref["$ref"].rsplit("/", 1)[1] in document["components"]["schemas"]


@pytest.mark.parametrize("query", [
    dict(entity_type="user", name=None, relation="follows"),
    dict(entity_type="user", name=None, relation="favorites"),
    dict(entity_type="tweet", name=None, relation="favorites"),  # reverse: who favours it
    dict(entity_type="user", name=None),  # same-type neighbours
])
def test_neighbors_equal_the_library(server, run_dir, query):
  retriever = server.service.snapshot.retriever
  for row in (0, 7, 123):
    name = retriever.names(query["entity_type"])[row]
    body = dict(query, name=name, k=12, exact=True)
    status, answer = call(server, "POST", "/neighbors", {k: v for k, v in body.items()
                                                         if v is not None})
    assert status == 200, answer
    expected = retriever.neighbors(query["entity_type"], name, relation=query.get("relation"),
                                   k=12, exact=True)
    assert [n["name"] for n in answer["neighbors"]] == [n.name for n in expected]
    np.testing.assert_allclose([n["score"] for n in answer["neighbors"]],
                               [n.score for n in expected], rtol=1e-6)
  # The ScaNN path answers too (near-exhaustive on a 2,000-row table).
  status, answer = call(server, "POST", "/neighbors",
                        dict(entity_type="user", name=name, relation="favorites", k=5)
                        if query["entity_type"] == "user" else
                        dict(entity_type="tweet", name=name, k=5))
  assert status == 200 and len(answer["neighbors"]) == 5


def test_score_is_the_model_score(server):
  retriever = server.service.snapshot.retriever
  user = retriever.names("user")[5]
  status, found = call(server, "POST", "/neighbors",
                       dict(entity_type="user", name=user, relation="favorites", k=3, exact=True))
  triples = [[user, "favorites", n["name"]] for n in found["neighbors"]]
  triples.append([retriever.names("user")[1], "follows", retriever.names("user")[2]])
  status, scored = call(server, "POST", "/score", {"triples": triples})
  assert status == 200, scored
  np.testing.assert_allclose(scored["scores"][:3], [n["score"] for n in found["neighbors"]],
                             rtol=1e-5, atol=1e-6)
  rel = retriever.relation("follows")
  theta_s = retriever.table("user")[retriever.lookup("user", triples[-1][0])]
  theta_t = retriever.table("user")[retriever.lookup("user", triples[-1][2])]
  expected = model.compare_pairs(retriever.comparator,
                                 model.apply_operator(rel.operator, jnp.asarray(rel.forward),
                                                      jnp.asarray(theta_s)), jnp.asarray(theta_t))
  assert scored["scores"][-1] == pytest.approx(float(expected), rel=1e-5, abs=1e-6)


def test_embedding(server):
  retriever = server.service.snapshot.retriever
  names = [retriever.names("tweet")[i] for i in (0, 9, 1999)]
  status, answer = call(server, "POST", "/embedding", {"entity_type": "tweet", "names": names})
  assert status == 200 and answer["dim"] == 64
  for item, row in zip(answer["embeddings"], (0, 9, 1999)):
    np.testing.assert_allclose(item["vector"], retriever.table("tweet")[row], rtol=1e-6)


def test_diverse_needs_a_mixture_then_answers(server, run_dir):
  retriever = server.service.snapshot.retriever
  user = retriever.names("user")[3]
  request = dict(entity_type="user", name=user, target_type="tweet", k=8)
  status, answer = call(server, "POST", "/diverse", request)
  assert status == 409 and "twhin cluster" in answer["error"]
  model_ = mixture.build_mixture(run_dir, "tweet", k=6, top_m=3, retriever=retriever,
                                 progress=False)
  status, answer = call(server, "POST", "/diverse", request)
  assert status == 200, answer
  # Default for a known user: cluster quotas, members ranked by the user's query.
  query = retriever.query_vectors(model_.relations[0], [3]).vectors[0]
  ids, _, _ = mixture.diverse_search(retriever, "tweet", model_.mixture(3), 8,
                                     clustering=model_.clustering, query=query)
  assert [r["id"] for r in answer["results"]] == ids.tolist()
  status, answer = call(server, "POST", "/diverse", dict(request, personal=False))
  ids, _, _ = mixture.diverse_search(retriever, "tweet", model_.mixture(3), 8,
                                     clustering=model_.clustering)
  assert status == 200 and [r["id"] for r in answer["results"]] == ids.tolist()
  assert abs(sum(c["weight"] for c in answer["mixture"]) - 1) < 1e-6
  tweets = retriever.names("tweet")
  status, answer = call(server, "POST", "/diverse", dict(
      entity_type="user", target_type="tweet", k=5,
      engagements=[["favorites", tweets[1]], ["retweets", tweets[2]]], exclude=[tweets[1]]))
  assert status == 200 and len(answer["results"]) == 5, answer
  assert tweets[1] not in [r["name"] for r in answer["results"]]


BAD = [
    ("GET", "/nope", None, 404),
    ("GET", "/neighbors", None, 405),
    ("POST", "/health", {}, 405),
    ("POST", "/neighbors", b"{not json", 400),
    ("POST", "/neighbors", b"[1, 2]", 400),
    ("POST", "/neighbors", {"entity_type": "user"}, 400),  # missing name
    ("POST", "/neighbors", {"entity_type": "planet", "name": "x"}, 400),
    ("POST", "/neighbors", {"entity_type": "user", "name": "no-such-user"}, 404),
    ("POST", "/neighbors", {"entity_type": "user", "name": "NAME", "relation": "likes"}, 400),
    ("POST", "/neighbors", {"entity_type": "user", "name": "NAME", "relation": "promotes"}, 400),
    ("POST", "/neighbors", {"entity_type": "user", "name": "NAME", "k": 0}, 400),
    ("POST", "/neighbors", {"entity_type": "user", "name": "NAME", "k": 1001}, 400),
    ("POST", "/neighbors", {"entity_type": "user", "name": "NAME", "k": "10"}, 400),
    ("POST", "/neighbors", {"entity_type": "user", "name": "NAME", "k": True}, 400),
    ("POST", "/neighbors", {"entity_type": "user", "name": 17}, 400),
    ("POST", "/neighbors", {"entity_type": "user", "name": "NAME", "exact": "yes"}, 400),
    ("POST", "/neighbors", {"entity_type": "user", "name": "NAME", "relation": "follows",
                            "direction": "sideways"}, 400),
    ("POST", "/neighbors", {"entity_type": "user", "name": "NAME", "path": "/etc/passwd"}, 400),
    ("POST", "/neighbors", {"entity_type": "user", "name": "../../etc/passwd"}, 404),
    ("POST", "/score", {"triples": "NAME follows NAME"}, 400),
    ("POST", "/score", {"triples": []}, 400),
    ("POST", "/score", {"triples": [["NAME", "follows"]]}, 400),
    ("POST", "/score", {"triples": [["NAME", "nope", "NAME"]]}, 400),
    ("POST", "/score", {"triples": [["NAME", "follows", "ghost"]]}, 404),
    ("POST", "/embedding", {"entity_type": "user", "names": ["NAME", 3]}, 400),
    ("POST", "/embedding", {"entity_type": "user", "names": ["NAME"] * 1001}, 400),
    ("POST", "/embedding", {"entity_type": "user", "names": "NAME"}, 400),
    ("POST", "/diverse", {"entity_type": "user", "target_type": "tweet"}, 400),
    ("POST", "/diverse", {"entity_type": "user", "target_type": "ad", "name": "NAME"}, 409),
    ("POST", "/reload", {"force": "please"}, 400),
    ("POST", "/embedding", b"x" * (64 * 1024 + 1), 413),
    ("POST", "/neighbors", b"", 400),  # no body: missing fields
    ("POST", "/neighbors", b"\xff\xfe{}", 400),  # not UTF-8
    ("POST", "/neighbors", {"entity_type": "user", "name": "NAME", "k": 10.0}, 400),
    ("POST", "/neighbors", {"entity_type": "user", "name": "NAME", "direction": "forward"}, 400),
    ("POST", "/diverse", {"entity_type": "user", "target_type": "tweet", "name": "NAME",
                          "engagements": [["favorites", "NAME"]]}, 400),
    ("POST", "/diverse", {"entity_type": "user", "target_type": "tweet",
                          "engagements": [["favorites"]]}, 400),
    ("PUT", "/neighbors", {"entity_type": "user", "name": "NAME"}, 405),
    ("DELETE", "/reload", None, 405),
    ("PATCH", "/health", None, 405),
    ("PUT", "/nope", None, 404),
]


@pytest.mark.parametrize("method,path,body,status", BAD,
                         ids=[f"{i}-{m}{p}" for i, (m, p, _, _) in enumerate(BAD)])
def test_bad_requests_get_4xx_with_a_message(server, method, path, body, status):
  name = server.service.snapshot.retriever.names("user")[0]
  raw = body if isinstance(body, bytes) else (
      None if body is None else json.dumps(body).replace('"NAME"', json.dumps(name)).encode())
  got, answer = call(server, method, path, raw=raw)
  assert got == status, answer
  assert isinstance(answer["error"], str) and len(answer["error"]) > 10


@pytest.mark.parametrize("depth", [500, 30_000])
def test_deeply_nested_json_is_a_400(server, depth):
  """The first server answered 500 (RecursionError in json.loads) at depth 30,000."""
  nested = b"[" * depth + b"]" * depth
  for raw in (b'{"triples": ' + nested + b"}", nested):
    status, answer = call(server, "POST", "/score", raw=raw)
    assert status == 400, answer
    assert ("nested too deeply" in answer["error"] if depth > 1000
            else "triples" in answer["error"] or "object" in answer["error"]), answer
  status, health = call(server, "GET", "/health")
  assert status == 200  # still serving


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
def test_other_methods_get_a_json_405(server, method):
  """The first server answered PUT and DELETE with the standard library's HTML 501."""
  for path, allowed in (("/neighbors", "POST"), ("/health", "GET")):
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    connection.request(method, path, body=b"{}")
    response = connection.getresponse()
    assert response.status == 405
    assert response.getheader("Content-Type") == "application/json"
    assert allowed in response.getheader("Allow")
    assert f"no route {method} {path}" in json.loads(response.read())["error"]
    connection.close()


def test_body_is_json_whatever_its_content_type(server):
  """`curl -d` sends application/x-www-form-urlencoded: the body is still read
  as JSON, as by the first server (FastAPI alone would refuse it)."""
  name = server.service.snapshot.retriever.names("user")[0]
  body = json.dumps({"entity_type": "user", "names": [name]}).encode()
  for content_type in ("application/x-www-form-urlencoded", "text/plain", None):
    headers = {"Content-Type": content_type} if content_type else {}
    status, answer = call(server, "POST", "/embedding", raw=body, headers=headers)
    assert status == 200 and answer["embeddings"][0]["name"] == name, answer


def test_missing_content_length_is_refused(server):
  connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
  connection.putrequest("POST", "/embedding")
  connection.endheaders()
  response = connection.getresponse()
  assert response.status == 411 and "Content-Length" in json.loads(response.read())["error"]
  connection.close()


@pytest.fixture()
def impatient_server(server):
  """A second server over the same service with 1 s request and keep-alive timeouts."""
  httpd = serve.make_server(server.service, "127.0.0.1", 0, request_timeout=1.0,
                            keep_alive_timeout=1)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield httpd
  httpd.shutdown()
  httpd.server_close()


def _read_until_closed(sock, limit: float) -> bytes:
  """Everything the server sends until it closes the connection (or ``limit`` s)."""
  sock.settimeout(limit)
  data = b""
  while True:
    chunk = sock.recv(65536)  # socket.timeout if the server never closes
    if not chunk:
      return data
    data += chunk


def test_slow_clients_are_cut_off_and_block_no_one(impatient_server):
  """40 clients that connect and then stall (nothing sent, half the headers,
  half the body): a normal request is still answered at once, and after the
  request timeout each stalled client gets a 408 and its connection is closed.
  The first server set no timeout: a stalled client held its thread forever."""
  import socket
  port = impatient_server.server_address[1]
  name = impatient_server.service.snapshot.retriever.names("user")[0]
  body = json.dumps({"entity_type": "user", "name": name}).encode()
  stalls = [b"", b"POST /neighbors HTTP/1.1\r\nHost: x\r\nContent-Le",
            b"POST /neighbors HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body[:10])]
  stalled = []
  started = time.monotonic()
  for i in range(40):
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(stalls[i % 3])
    stalled.append(sock)
  connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
  connection.request("POST", "/neighbors", body=body)
  response = connection.getresponse()
  assert response.status == 200 and len(json.loads(response.read())["neighbors"]) == 10
  assert time.monotonic() - started < 1.0  # answered before any stalled client timed out
  connection.close()
  for sock in stalled:
    answer = _read_until_closed(sock, limit=10)  # the server closes within ~1 s
    sock.close()
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"not received within 1 s" in answer
  assert time.monotonic() - started < 8


def test_idle_keep_alive_connection_is_closed(impatient_server):
  """After an answer, a connection that stays silent past the keep-alive
  timeout is closed by the server (the first server kept it open)."""
  import socket
  sock = socket.create_connection(("127.0.0.1", impatient_server.server_address[1]))
  sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
  started = time.monotonic()
  answer = _read_until_closed(sock, limit=10)
  sock.close()
  assert answer.startswith(b"HTTP/1.1 200 ") and b'"status":"ok"' in answer
  assert 0.5 < time.monotonic() - started < 5


def test_oversized_headers_are_refused(server):
  import socket
  sock = socket.create_connection(("127.0.0.1", server.server_address[1]))
  sock.sendall(b"GET /health HTTP/1.1\r\n" + b"X-Filler: " + b"a" * 100_000 + b"\r\n")
  answer = _read_until_closed(sock, limit=10)
  sock.close()
  assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]


def test_load_test_tool(server, run_dir):
  """tools/load_test.py against the running server: bounded, no errors."""
  import importlib.util
  import os
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools",
                      "load_test.py")
  spec = importlib.util.spec_from_file_location("load_test", path)
  load_test = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(load_test)
  names, relations = load_test.load_vocab(run_dir)
  summary = load_test.run_load("127.0.0.1", server.server_address[1], names, relations,
                               concurrency=3, requests=60, duration=30)
  assert summary["requests"] == 60 and summary["errors"] == 0
  assert summary["p50_ms"] <= summary["p99_ms"] and summary["throughput_rps"] > 0
  assert set(summary["routes"]) <= {"neighbors", "neighbors_exact", "score", "embedding"}


def test_reload_frees_the_old_snapshot(server):
  """After a reload, nothing keeps the previous snapshot (its retriever,
  tables and searchers) alive: memory stays flat over many reloads."""
  import gc
  import weakref
  service = server.service
  olds = []
  for _ in range(2):
    olds.append(weakref.ref(service.snapshot))
    status, answer = call(server, "POST", "/reload", {"force": True})
    assert status == 200 and answer["reloaded"] is True, answer
    assert call(server, "GET", "/health")[0] == 200
  gc.collect()
  assert all(old() is None for old in olds)
  assert service.snapshot is not None


def test_reload_swaps_versions_under_load(server, run_dir):
  """Train one more epoch into the run while two threads keep querying;
  POST /reload switches to the new checkpoint, then the --watch poller to the
  next one, with zero failed requests. Runs last (it changes the run)."""
  service = server.service
  before = service.snapshot
  reloads_before = service.reloads
  assert call(server, "POST", "/reload", {})[1]["reloaded"] is False  # nothing new
  names = before.retriever.names("user")
  stop = threading.Event()
  outcomes = {"ok": 0, "errors": [], "versions": set()}

  def hammer():
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
    i = 0
    while not stop.is_set():
      body = json.dumps({"entity_type": "user", "name": names[i % len(names)],
                         "relation": "favorites", "k": 5}).encode()
      i += 1
      try:
        connection.request("POST", "/neighbors", body=body)
        response = connection.getresponse()
        answer = json.loads(response.read())
        if response.status == 200 and len(answer["neighbors"]) == 5:
          outcomes["ok"] += 1
          outcomes["versions"].add(answer["version_id"])
        else:
          outcomes["errors"].append((response.status, answer))
      except Exception as err:  # a dropped connection is an error too
        outcomes["errors"].append(repr(err))
        connection.close()
        connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
    connection.close()

  threads = [threading.Thread(target=hammer) for _ in range(2)]
  for thread in threads:
    thread.start()
  config = train_lib.load_run_config(run_dir)
  config.train.epochs += 1  # resumable: one more epoch, a new checkpoint
  train_lib.train(config, run_dir, progress=False).close()
  status, answer = call(server, "POST", "/reload", {})
  served_during = outcomes["ok"]
  assert status == 200 and answer["reloaded"] is True, answer
  assert answer["checkpoint"]["hash"] != before.checkpoint["hash"]
  assert answer["previous"]["checkpoint"]["hash"] == before.checkpoint["hash"]
  # --watch: the poller picks up the next checkpoint by itself.
  service.watch(0.2)
  config.train.epochs += 1
  train_lib.train(config, run_dir, progress=False).close()
  deadline = time.time() + 60
  while service.reloads < reloads_before + 2 and time.time() < deadline:
    time.sleep(0.1)
  time.sleep(0.3)
  stop.set()
  for thread in threads:
    thread.join(timeout=60)
  assert not outcomes["errors"], outcomes["errors"][:3]
  assert served_during > 0 and outcomes["ok"] > served_during
  status, health = call(server, "GET", "/health")
  assert health["checkpoint"]["hash"] == retrieval.checkpoint_identity(run_dir)["hash"]
  assert health["reloads"] == reloads_before + 2 and health["last_reload_error"] is None
  # The new snapshot answers with the new tables; the mixture is now stale.
  fresh = retrieval.Retriever.open(run_dir, exact_below=500, progress=False)
  user = names[0]
  status, answer = call(server, "POST", "/neighbors", dict(entity_type="user", name=user,
                                                           relation="follows", k=5, exact=True))
  assert [n["name"] for n in answer["neighbors"]] == [
      n.name for n in fresh.neighbors("user", user, relation="follows", k=5, exact=True)]
  status, answer = call(server, "POST", "/diverse", dict(entity_type="user", name=user,
                                                         target_type="tweet"))
  assert status == 409 and "twhin cluster" in answer["error"]  # missing or stale (rebuilt)
