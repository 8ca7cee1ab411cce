"""Load test of ``twhin serve``: throughput, latency percentiles, errors,
and (for a soak) the server's memory over time and a hot reload under load.

    .venv/bin/python tools/load_test.py --workdir DIR [--url http://host:port]
        [--concurrency 8] [--requests 2000] [--duration 30] [--json]
    # a 10-minute soak at saturation with a reload half way:
    .venv/bin/python tools/load_test.py --workdir DIR --requests 0 --duration 600 \
        --reload-at 300 --sample-every 10 --json

Without --url it starts ``twhin serve --workdir DIR`` on a free local port in
a subprocess (its own interpreter and GIL), from this checkout or from
--server-root (another checkout, e.g. an older version to compare with),
waits for /health, and stops it at the end. With --url it targets a running
server (give --server-pid to sample its memory and CPU); --workdir is still
read (``<workdir>/index/run.json`` and ``export/<type>.names.txt``, as
written by the server) to draw entity names and relations.

Each of N threads keeps one HTTP/1.1 connection and sends requests drawn
(seeded per thread) from the mix

  50% /neighbors  relation-aware, a random relation and source, k = 10 (index path)
  15% /neighbors  same-type neighbours, k = 10, exact
  20% /score      16 random triples
  15% /embedding  8 random names

until --requests have been sent in total (0: no limit) or --duration seconds
have passed. --reload-at T sends ``POST /reload {"force": true}`` T seconds
into the measured run from one more thread (the server builds a new snapshot
while the mix goes on); its answer and time are reported. Latency is
measured per request around send + full response read. With a server pid,
its RSS and CPU time are sampled every --sample-every seconds (psutil).
Prints a table, or with --json one JSON object: throughput (requests/s),
p50/p90/p99 and max latency (ms), errors (non-2xx or failed), the same per
route and per minute, the reload, and the server's RSS (start, end, max,
samples) and CPU milliseconds per request.
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


class ServerSampler:
  """Samples a server process's RSS and CPU time every ``every`` seconds."""

  def __init__(self, pid: int | None, every: float):
    import psutil
    self.process = psutil.Process(pid) if pid else None
    self.every = every
    self.samples: list[dict] = []
    self._stop = threading.Event()
    self._thread = None
    self._started = time.perf_counter()

  def sample(self) -> dict | None:
    if self.process is None:
      return None
    times = self.process.cpu_times()
    point = {"t": round(time.perf_counter() - self._started, 1),
             "rss_mb": round(self.process.memory_info().rss / 2**20, 1),
             "cpu_s": round(times.user + times.system, 2)}
    self.samples.append(point)
    return point

  def __enter__(self):
    self._started = time.perf_counter()
    self.sample()

    def loop():
      while not self._stop.wait(self.every):
        self.sample()

    if self.process is not None:
      self._thread = threading.Thread(target=loop, daemon=True)
      self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    self.sample()

  def summary(self, requests: int) -> dict | None:
    if len(self.samples) < 2:
      return None
    first, last = self.samples[0], self.samples[-1]
    return {"rss_start_mb": first["rss_mb"], "rss_end_mb": last["rss_mb"],
            "rss_max_mb": max(p["rss_mb"] for p in self.samples),
            "cpu_ms_per_request": round((last["cpu_s"] - first["cpu_s"]) * 1e3 / max(requests, 1), 3),
            "samples": self.samples}


def reload_at(host: str, port: int, delay: float, out: dict) -> threading.Thread:
  """POST /reload {"force": true} after ``delay`` seconds, in a thread."""

  def run():
    time.sleep(delay)
    connection = http.client.HTTPConnection(host, port, timeout=600)
    started = time.perf_counter()
    try:
      connection.request("POST", "/reload", body=b'{"force": true}',
                         headers={"Content-Type": "application/json"})
      response = connection.getresponse()
      answer = json.loads(response.read())
      out.update(status=response.status, reloaded=answer.get("reloaded"),
                 load_seconds=answer.get("load_seconds"), version_id=answer.get("version_id"),
                 error=answer.get("error"))
    except (OSError, http.client.HTTPException, ValueError) as err:
      out.update(status=None, error=repr(err))
    out.update(at_s=round(delay, 1), seconds=round(time.perf_counter() - started, 2))
    connection.close()

  thread = threading.Thread(target=run, daemon=True)
  thread.start()
  return thread


def run_load(host: str, port: int, names: dict, relations: list[dict], *, concurrency: int,
             requests: int, duration: float, seed: int = 0, reload_after: float | None = None,
             server_pid: int | None = None, sample_every: float = 10.0) -> dict:
  """Sends the mix from ``concurrency`` threads (``requests=0``: until
  ``duration`` runs out); returns the summary."""
  lock = threading.Lock()
  budget = {"left": requests if requests > 0 else float("inf")}
  records: list[tuple[str, float, bool, float]] = []  # route, latency, ok, finished at
  started = time.perf_counter()
  deadline = started + duration

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
      sent = time.perf_counter()
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
      done = time.perf_counter()
      local.append((label, done - sent, ok, done - started))
    connection.close()
    with lock:
      records.extend(local)

  reload_result: dict = {}
  with ServerSampler(server_pid, sample_every) as sampler:
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    started = time.perf_counter()
    deadline = started + duration
    reloader = (reload_at(host, port, reload_after, reload_result)
                if reload_after is not None else None)
    for thread in threads:
      thread.start()
    for thread in threads:
      thread.join()
    elapsed = time.perf_counter() - started
    if reloader is not None:
      reloader.join()
  summary = summarize(records, elapsed, concurrency)
  if reload_after is not None:
    summary["reload"] = reload_result
  server = sampler.summary(len(records))
  if server is not None:
    summary["server"] = server
  return summary


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
  if elapsed > 120:  # a soak: the same figures per minute, to see drift
    summary["minutes"] = []
    for minute in range(int(np.ceil(elapsed / 60))):
      mine = [r for r in records if minute * 60 <= r[3] < (minute + 1) * 60]
      span = min(60.0, elapsed - minute * 60)
      if mine and span > 0:
        summary["minutes"].append(dict(minute=minute, **_stats(
            [r[1] for r in mine], sum(not r[2] for r in mine), span)))
  return summary


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="the trained run (names, relations)")
  parser.add_argument("--url", default=None, help="a running server (default: start one)")
  parser.add_argument("--server-root", default=ROOT,
                      help="checkout whose `twhin serve` is started (default: this one)")
  parser.add_argument("--server-pid", type=int, default=None,
                      help="with --url: the server's pid, to sample its RSS and CPU")
  parser.add_argument("--concurrency", type=int, default=8)
  parser.add_argument("--requests", type=int, default=2000, help="requests in all (0: no limit)")
  parser.add_argument("--duration", type=float, default=30.0, help="seconds at most")
  parser.add_argument("--reload-at", type=float, default=None, metavar="SECONDS",
                      help="POST /reload {force: true} this many seconds into the run")
  parser.add_argument("--sample-every", type=float, default=10.0, metavar="SECONDS",
                      help="server RSS/CPU sampling interval")
  parser.add_argument("--warmup", type=int, default=50, help="requests sent first, not counted")
  parser.add_argument("--startup-timeout", type=float, default=600.0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args(argv)
  if args.concurrency < 1 or args.requests < 0 or args.duration <= 0:
    parser.error("--concurrency must be >= 1, --requests >= 0, --duration > 0")
  if args.reload_at is not None and not 0 <= args.reload_at < args.duration:
    parser.error("--reload-at must be within --duration")

  process = None
  server_pid = args.server_pid
  if args.url:
    parsed = urllib.parse.urlparse(args.url)
    host, port = parsed.hostname, parsed.port or 80
  else:
    host, port = "127.0.0.1", free_port()
    environment = dict(os.environ, PYTHONPATH=os.path.abspath(args.server_root))
    process = subprocess.Popen(
        [sys.executable, "-m", "twhin_jax.cli", "serve", "--workdir",
         os.path.abspath(args.workdir), "--host", host, "--port", str(port), "--quiet"],
        cwd=args.server_root, env=environment)
    server_pid = process.pid
  try:
    health = wait_healthy(host, port, args.startup_timeout, process)
    names, relations = load_vocab(args.workdir)
    if args.warmup:
      run_load(host, port, names, relations, concurrency=args.concurrency,
               requests=args.warmup, duration=args.duration, seed=args.seed + 1)
    summary = run_load(host, port, names, relations, concurrency=args.concurrency,
                       requests=args.requests, duration=args.duration, seed=args.seed,
                       reload_after=args.reload_at, server_pid=server_pid,
                       sample_every=args.sample_every)
    summary.update(workdir=args.workdir, server_root=os.path.abspath(args.server_root),
                   version_id=health["version_id"], indexes=health.get("indexes"),
                   entities=health["counts"]["entities"])
  finally:
    if process is not None:
      process.terminate()
      try:
        process.wait(timeout=30)
      except subprocess.TimeoutExpired:
        process.kill()
  reload_failed = "reload" in summary and not (summary["reload"].get("status") == 200
                                               and summary["reload"].get("reloaded"))
  if args.json:
    print(json.dumps(summary))
  else:
    print(f"{summary['requests']} requests in {summary['seconds']} s from "
          f"{summary['concurrency']} threads: {summary['throughput_rps']} req/s, "
          f"p50 {summary['p50_ms']} ms, p99 {summary['p99_ms']} ms, errors {summary['errors']}")
    for label, stats in summary["routes"].items():
      print(f"  {label:<16} {stats['requests']:>6}  p50 {stats['p50_ms']:>8} ms  "
            f"p99 {stats['p99_ms']:>8} ms  errors {stats['errors']}")
    if "reload" in summary:
      print(f"  reload: {summary['reload']}")
    if "server" in summary:
      server = summary["server"]
      print(f"  server RSS {server['rss_start_mb']} -> {server['rss_end_mb']} MB "
            f"(max {server['rss_max_mb']}), {server['cpu_ms_per_request']} CPU ms/request")
  return 1 if summary["errors"] or reload_failed else 0


if __name__ == "__main__":
  sys.exit(main())
