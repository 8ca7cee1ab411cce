"""Load test of ``twhin serve``: throughput, latency percentiles, errors.

    .venv/bin/python tools/load_test.py --workdir DIR [--url http://host:port]
        [--concurrency 8] [--requests 2000] [--duration 30] [--json]

Without --url it starts ``twhin serve --workdir DIR`` on a free local port in
a subprocess (its own interpreter and GIL), waits for /health, and stops it
at the end. With --url it targets a running server; --workdir is still read
(``<workdir>/index/run.json`` and ``export/<type>.names.txt``, as written by
the server) to draw entity names and relations.

Each of N threads keeps one HTTP/1.1 connection and sends requests drawn
(seeded per thread) from the mix

  50% /neighbors  relation-aware, a random relation and source, k = 10 (index path)
  15% /neighbors  same-type neighbours, k = 10, exact
  20% /score      16 random triples
  15% /embedding  8 random names

until --requests have been sent in total or --duration seconds have passed.
Latency is measured per request around send + full response read. Prints a
table, or with --json one JSON object: throughput (requests/s), p50/p90/p99
and max latency (ms), errors (non-2xx or failed), and the same per route.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def wait_healthy(host: str, port: int, timeout: float, process=None) -> dict:
  deadline = time.time() + timeout
  while time.time() < deadline:
    if process is not None and process.poll() is not None:
      raise RuntimeError(f"the server exited with code {process.returncode}")
    try:
      connection = http.client.HTTPConnection(host, port, timeout=5)
      connection.request("GET", "/health")
      response = connection.getresponse()
      body = json.loads(response.read())
      connection.close()
      if response.status == 200:
        return body
    except OSError:
      pass
    time.sleep(0.5)
  raise TimeoutError(f"no healthy server at {host}:{port} after {timeout:.0f} s")


def load_vocab(workdir: str) -> tuple[dict, list[dict]]:
  """(type -> names, relations) of a prepared run."""
  with open(os.path.join(workdir, "index", "run.json")) as f:
    run = json.load(f)
  names = {}
  for entity_type in run["entities"]:
    with open(os.path.join(workdir, run.get("export_dir", "export"), f"{entity_type}.names.txt"),
              encoding="utf-8") as f:
      names[entity_type] = [line.rstrip("\n") for line in f]
  return names, run["relations"]


def request_mix(rng: random.Random, names: dict, relations: list[dict]) -> tuple[str, dict, str]:
  """(path, body, label) of one random request."""
  draw = rng.random()
  if draw < 0.50:
    rel = rng.choice(relations)
    return "/neighbors", {"entity_type": rel["source"], "name": rng.choice(names[rel["source"]]),
                          "relation": rel["name"], "k": 10}, "neighbors"
  if draw < 0.65:
    entity_type = rng.choice(sorted(names))
    return "/neighbors", {"entity_type": entity_type, "name": rng.choice(names[entity_type]),
                          "k": 10, "exact": True}, "neighbors_exact"
  if draw < 0.85:
    triples = []
    for _ in range(16):
      rel = rng.choice(relations)
      triples.append([rng.choice(names[rel["source"]]), rel["name"],
                      rng.choice(names[rel["target"]])])
    return "/score", {"triples": triples}, "score"
  entity_type = rng.choice(sorted(names))
  return "/embedding", {"entity_type": entity_type,
                        "names": [rng.choice(names[entity_type]) for _ in range(8)]}, "embedding"


def run_load(host: str, port: int, names: dict, relations: list[dict], *, concurrency: int,
             requests: int, duration: float, seed: int = 0) -> dict:
  """Sends the mix from ``concurrency`` threads; returns the summary."""
  lock = threading.Lock()
  budget = {"left": requests}
  records: list[tuple[str, float, bool]] = []
  deadline = time.perf_counter() + duration

  def take() -> bool:
    with lock:
      if budget["left"] <= 0 or time.perf_counter() >= deadline:
        return False
      budget["left"] -= 1
      return True

  def worker(index: int) -> None:
    rng = random.Random(seed * 1000 + index)
    connection = http.client.HTTPConnection(host, port, timeout=60)
    local = []
    while take():
      path, body, label = request_mix(rng, names, relations)
      payload = json.dumps(body).encode()
      started = time.perf_counter()
      ok = False
      try:
        connection.request("POST", path, body=payload,
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        ok = 200 <= response.status < 300
      except (OSError, http.client.HTTPException):
        connection.close()
        connection = http.client.HTTPConnection(host, port, timeout=60)
      local.append((label, time.perf_counter() - started, ok))
    connection.close()
    with lock:
      records.extend(local)

  threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
  started = time.perf_counter()
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  elapsed = time.perf_counter() - started
  return summarize(records, elapsed, concurrency)


def _stats(latencies: list[float], errors: int, elapsed: float) -> dict:
  ms = np.asarray(latencies) * 1e3
  return {"requests": len(latencies), "errors": errors,
          "throughput_rps": round(len(latencies) / elapsed, 1) if elapsed > 0 else 0.0,
          "p50_ms": round(float(np.percentile(ms, 50)), 2) if len(ms) else None,
          "p90_ms": round(float(np.percentile(ms, 90)), 2) if len(ms) else None,
          "p99_ms": round(float(np.percentile(ms, 99)), 2) if len(ms) else None,
          "max_ms": round(float(ms.max()), 2) if len(ms) else None}


def summarize(records, elapsed: float, concurrency: int) -> dict:
  summary = _stats([r[1] for r in records], sum(not r[2] for r in records), elapsed)
  summary.update(concurrency=concurrency, seconds=round(elapsed, 2), routes={})
  for label in sorted({r[0] for r in records}):
    mine = [r for r in records if r[0] == label]
    summary["routes"][label] = _stats([r[1] for r in mine], sum(not r[2] for r in mine), elapsed)
  return summary


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="the trained run (names, relations)")
  parser.add_argument("--url", default=None, help="a running server (default: start one)")
  parser.add_argument("--concurrency", type=int, default=8)
  parser.add_argument("--requests", type=int, default=2000)
  parser.add_argument("--duration", type=float, default=30.0, help="seconds at most")
  parser.add_argument("--warmup", type=int, default=50, help="requests sent first, not counted")
  parser.add_argument("--startup-timeout", type=float, default=600.0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args(argv)
  if args.concurrency < 1 or args.requests < 1 or args.duration <= 0:
    parser.error("--concurrency and --requests must be >= 1, --duration > 0")

  process = None
  if args.url:
    parsed = urllib.parse.urlparse(args.url)
    host, port = parsed.hostname, parsed.port or 80
  else:
    host, port = "127.0.0.1", free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "twhin_jax.cli", "serve", "--workdir", args.workdir,
         "--host", host, "--port", str(port), "--quiet"], cwd=ROOT)
  try:
    health = wait_healthy(host, port, args.startup_timeout, process)
    names, relations = load_vocab(args.workdir)
    if args.warmup:
      run_load(host, port, names, relations, concurrency=args.concurrency,
               requests=args.warmup, duration=args.duration, seed=args.seed + 1)
    summary = run_load(host, port, names, relations, concurrency=args.concurrency,
                       requests=args.requests, duration=args.duration, seed=args.seed)
    summary.update(workdir=args.workdir, version_id=health["version_id"],
                   indexes=health.get("indexes"), entities=health["counts"]["entities"])
  finally:
    if process is not None:
      process.terminate()
      try:
        process.wait(timeout=30)
      except subprocess.TimeoutExpired:
        process.kill()
  if args.json:
    print(json.dumps(summary))
  else:
    print(f"{summary['requests']} requests in {summary['seconds']} s from "
          f"{summary['concurrency']} threads: {summary['throughput_rps']} req/s, "
          f"p50 {summary['p50_ms']} ms, p99 {summary['p99_ms']} ms, errors {summary['errors']}")
    for label, stats in summary["routes"].items():
      print(f"  {label:<16} {stats['requests']:>6}  p50 {stats['p50_ms']:>8} ms  "
            f"p99 {stats['p99_ms']:>8} ms  errors {stats['errors']}")
  return 1 if summary["errors"] else 0


if __name__ == "__main__":
  sys.exit(main())
