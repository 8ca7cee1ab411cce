"""Hyper-parameter sweeps: one config file, many runs, one results table.

A config file may define ``get_sweep()`` (or ``get_sweep(variant)``) beside
``get_config``. It returns either

* a grid, ``{"train.lr": [0.05, 0.1], "model.dim": [100, 200]}``: the product
  of the value lists, the first key varying slowest (4 runs here); or
* a list of runs, ``[{"train.lr": 0.05}, {"train.lr": 0.1, "model.dim": 50}]``:
  each dict is one run's overrides, values taken literally.

:func:`grid` builds the list of a grid, so the two compose
(``grid({...}) + [{...}]``). Keys are config fields as on the command line,
without ``--config.`` (a leading ``config.`` is accepted). Overrides go
through ``config.load_config`` exactly as ``--config.KEY=VALUE`` arguments do,
so a sweep run and its emitted ``twhin train`` command build the same config.

Layout of a sweep directory::

  <workdir>/sweep.json          the runs: name, overrides, graph key
  <workdir>/_graphs/<key>/graph one imported graph per distinct import setting
  <workdir>/<run name>/         a run directory (``twhin train --workdir``)
     graph -> ../_graphs/<key>/graph   (relative symlink)
     eval_<split>.json           written after training; marks the run done
  <workdir>/results.csv, results.md   the table, best first

Runs whose import settings are equal (entities' partition counts, relations,
``data.*`` and ``train.seed``, the fields the importer reads) share one
import through a symlink: the imported graph is read-only during training
(bucket arrays are memory-mapped), so sharing is safe, costs no disk or time,
and keeps the graph manifest hash, and so the lineage, identical across runs.
A copy would only add the import's size to every run.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import inspect
import itertools
import json
import math
import os
import re
import shlex
import sys
import time

from twhin_jax import config as config_lib
from twhin_jax import rundir

SWEEP_FILE = "sweep.json"
GRAPHS_DIR = "_graphs"
RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
#: Metrics a table may be sorted by; True: larger is better.
METRICS = {"mrr": True, "mr": False, "hits@1": True, "hits@3": True, "hits@10": True,
           "auc": True}
_MAX_NAME = 80
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")


# ---------------------------------------------------------------------------
# Expansion and naming (pure).


def grid(axes: dict) -> list[dict]:
  """The runs of a grid: one dict per element of the product of the value lists.

  ``grid({"a": [1, 2], "b": [3]}) == [{"a": 1, "b": 3}, {"a": 2, "b": 3}]``;
  the first key varies slowest. A scalar value counts as a one-value list.
  """
  keys = list(axes)
  values = [v if isinstance(v, (list, tuple)) else [v] for v in axes.values()]
  for key, options in zip(keys, values):
    if not options:
      raise ValueError(f"sweep grid: {key!r} has no values")
  return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def expand(spec) -> list[dict]:
  """A ``get_sweep()`` result (grid dict or list of override dicts) -> runs."""
  if isinstance(spec, dict):
    runs = grid(spec)
  elif isinstance(spec, (list, tuple)):
    runs = []
    for i, item in enumerate(spec):
      if not isinstance(item, dict):
        raise ValueError(f"sweep run {i}: expected a dict of overrides, got {item!r}")
      runs.append(dict(item))
  else:
    raise ValueError(f"get_sweep() must return a dict (grid) or a list of dicts, got "
                     f"{type(spec).__name__}")
  runs = [{_field(k): v for k, v in run.items()} for run in runs]
  if not runs:
    raise ValueError("the sweep has no runs")
  seen = set()
  for run in runs:
    key = _canonical(run)
    if key in seen:
      raise ValueError(f"sweep: run {run} appears twice")
    seen.add(key)
  return runs


def _field(key: str) -> str:
  key = key[len("--config."):] if key.startswith("--config.") else key
  key = key[len("config."):] if key.startswith("config.") else key
  if not key or "=" in key:
    raise ValueError(f"sweep: bad config field {key!r}")
  return key


def _canonical(overrides: dict) -> str:
  return json.dumps(overrides, sort_keys=True, default=repr)


def format_value(value) -> str:
  """The VALUE of ``--config.KEY=VALUE``: a Python literal that
  ``config.load_config`` parses back to ``value`` (a plain string when that is
  unambiguous)."""
  if isinstance(value, str):
    try:
      ast.literal_eval(value)
    except (ValueError, SyntaxError):
      return value  # not a literal: load_config keeps it as a string
    return repr(value)
  return repr(value)


def override_args(overrides: dict) -> list[str]:
  return [f"--config.{key}={format_value(value)}" for key, value in overrides.items()]


def run_name(overrides: dict) -> str:
  """A short, readable, filesystem-safe name: ``train.lr=0.05,model.dim=100``.

  Characters outside ``[A-Za-z0-9._=,+-]`` become ``_``; a name longer than
  80 characters is cut and ends in a hash of the overrides. "base" when
  there are none. Stable: the same overrides give the same name.
  """
  if not overrides:
    return "base"
  name = ",".join(f"{k}={format_value(v)}" for k, v in overrides.items())
  name = _UNSAFE.sub("_", name)
  if len(name) > _MAX_NAME:
    name = f"{name[:_MAX_NAME - 9]}-{_digest(overrides)}"
  return name


def run_names(runs: list[dict]) -> list[str]:
  """Names of all runs, unique: colliding names get a hash suffix."""
  names = [run_name(run) for run in runs]
  counts: dict[str, int] = {}
  for name in names:
    counts[name] = counts.get(name, 0) + 1
  return [f"{name}-{_digest(run)}" if counts[name] > 1 else name
          for name, run in zip(names, runs)]


def _digest(overrides: dict) -> str:
  return hashlib.sha256(_canonical(overrides).encode()).hexdigest()[:8]


def graph_key(config) -> str:
  """Hash of the config fields the importer reads (see the module docstring)."""
  data = config_lib.to_json_dict(config)
  wanted = {
      "entities": {t: int(e["num_partitions"]) for t, e in data["entities"].items()},
      "relations": data["relations"],
      "data": data["data"],
      "seed": data["train"]["seed"],
  }
  return hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------
# Loading a sweep.


def load_sweep(spec: str) -> list[dict]:
  """The runs of ``path/to/config.py[:variant]``'s ``get_sweep``."""
  path, _, variant = spec.partition(":")
  module = config_lib.load_module(path, prefix="twhin_sweep")
  get_sweep = getattr(module, "get_sweep", None)
  if get_sweep is None:
    raise ValueError(f"{path} defines no get_sweep(); see docs/sweeps.md")
  takes_variant = bool(inspect.signature(get_sweep).parameters)
  return expand(get_sweep(variant) if takes_variant else get_sweep())


class Sweep:
  """The runs of one sweep directory: names, overrides, configs."""

  def __init__(self, spec: str, workdir: str, base_overrides: list[str] = ()):
    self.spec = spec
    self.workdir = workdir
    self.base_overrides = list(base_overrides)
    self.runs = load_sweep(spec)
    self.names = run_names(self.runs)
    self.configs = []
    for name, run in zip(self.names, self.runs):
      try:
        config = config_lib.load_config(spec, self.base_overrides + override_args(run))
        config_lib.validate(config)
      except ValueError as err:
        raise ValueError(f"sweep run {name}: {err}") from None
      self.configs.append(config)

  def run_dir(self, name: str) -> str:
    return os.path.join(self.workdir, name)

  def write_manifest(self) -> None:
    os.makedirs(self.workdir, exist_ok=True)
    manifest = {"config": self.spec, "base_overrides": self.base_overrides,
                "runs": [{"name": n, "overrides": r, "graph": graph_key(c)}
                         for n, r, c in zip(self.names, self.runs, self.configs)]}
    tmp = os.path.join(self.workdir, SWEEP_FILE + ".tmp")
    with open(tmp, "w") as f:
      json.dump(manifest, f, indent=1, default=repr)
    os.replace(tmp, os.path.join(self.workdir, SWEEP_FILE))

  def link_graph(self, name: str, config) -> str:
    """Points <run>/graph at the shared import; returns the shared import's workdir."""
    shared = os.path.join(self.workdir, GRAPHS_DIR, graph_key(config))
    run_dir = self.run_dir(name)
    os.makedirs(run_dir, exist_ok=True)
    link = os.path.join(run_dir, rundir.GRAPH_DIR)
    target = os.path.relpath(os.path.join(shared, rundir.GRAPH_DIR), run_dir)
    if os.path.islink(link):
      if os.readlink(link) != target:
        raise ValueError(f"{link} points at {os.readlink(link)}, expected {target}")
    elif os.path.exists(link):
      pass  # a run imported its own graph (e.g. started before the sweep): keep it
    else:
      os.makedirs(shared, exist_ok=True)
      os.symlink(target, link)
    return shared


eval_file = rundir.eval_file


def is_done(run_dir: str, split: str) -> bool:
  return os.path.exists(eval_file(run_dir, split))


# ---------------------------------------------------------------------------
# Running.


def run_sweep(spec: str, workdir: str, *, split: str = "valid", metric: str = "mrr",
              base_overrides: list[str] = (), progress: bool = True) -> list[dict]:
  """Trains and evaluates every unfinished run, one after another; returns the table.

  A run is finished when ``<run>/eval_<split>.json`` exists; an interrupted
  run resumes from its last checkpoint (``train.train``).
  """
  # train imports jax; emitting commands and collecting results do not need it.
  from twhin_jax import train as train_lib
  _check_metric(metric)
  sweep = Sweep(spec, workdir, base_overrides)
  sweep.write_manifest()
  total = len(sweep.names)
  for i, (name, config) in enumerate(zip(sweep.names, sweep.configs), 1):
    run_dir = sweep.run_dir(name)
    if is_done(run_dir, split):
      _say(f"[{i}/{total}] {name}: done, skipped")
      continue
    shared = sweep.link_graph(name, config)
    train_lib.prepare_graph(config, shared, progress=progress)  # once per graph key
    _say(f"[{i}/{total}] {name}: training")
    started = time.perf_counter()
    trainer = train_lib.train(config, run_dir, progress=progress)
    try:
      metrics = trainer.evaluate(split, progress=progress)
    finally:
      trainer.close()
    metrics["sweep"] = {"name": name, "overrides": sweep.runs[i - 1],
                        "seconds": time.perf_counter() - started}
    rundir.write_json_atomically(eval_file(run_dir, split), metrics, default=repr)
    _say(f"[{i}/{total}] {name}: {split} {metric} {metrics[metric]:.4f}")
  return collect(workdir, split=split, metric=metric)


def emit_commands(spec: str, workdir: str, *, split: str = "valid",
                  base_overrides: list[str] = (), twhin: str = "twhin") -> list[str]:
  """Shell lines for a cluster: one ``twhin import`` per shared graph, then one
  ``twhin train ... && twhin eval ...`` per unfinished run.

  Writes sweep.json and the runs' graph symlinks (to where the imports will
  land), so ``twhin sweep --collect`` finds the runs afterwards. Run the
  import lines first; the run lines are independent of each other.
  """
  sweep = Sweep(spec, workdir, base_overrides)
  sweep.write_manifest()
  lines, imported = [], set()
  for name, run, config in zip(sweep.names, sweep.runs, sweep.configs):
    run_dir = sweep.run_dir(name)
    if is_done(run_dir, split):
      continue
    shared = sweep.link_graph(name, config)
    common = ["--config", spec, *sweep.base_overrides, *override_args(run)]
    if shared not in imported and not os.path.exists(os.path.join(shared, rundir.GRAPH_DIR,
                                                                 "manifest.json")):
      imported.add(shared)
      lines.append(_join([twhin, "import", "--quiet", "--workdir", shared] + common))
    train = _join([twhin, "train", "--quiet", "--workdir", run_dir] + common)
    evaluate = _join([twhin, "eval", "--quiet", "--workdir", run_dir, "--split", split])
    lines.append(f"{train} && {evaluate}")
  # Imports first, whatever order the runs came in.
  return sorted(lines, key=lambda line: " import " not in line)


def _join(words: list[str]) -> str:
  return " ".join(shlex.quote(w) for w in words)


# ---------------------------------------------------------------------------
# Collecting.


def collect(workdir: str, *, split: str = "valid", metric: str = "mrr") -> list[dict]:
  """Reads every run's metrics; writes results.csv and results.md, best first.

  Runs come from ``sweep.json``; runs without ``eval_<split>.json`` are
  listed last with status "pending".
  """
  _check_metric(metric)
  path = os.path.join(workdir, SWEEP_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no sweep here (run `twhin sweep` first)")
  with open(path) as f:
    manifest = json.load(f)
  keys = []
  for run in manifest["runs"]:
    keys.extend(k for k in run["overrides"] if k not in keys)
  rows = []
  for run in manifest["runs"]:
    run_dir = os.path.join(workdir, run["name"])
    row = {"name": run["name"], **{k: run["overrides"].get(k, "") for k in keys}}
    if is_done(run_dir, split):
      with open(eval_file(run_dir, split)) as f:
        metrics = json.load(f)
      row["status"] = "done"
      for key in METRICS:
        row[key] = metrics.get(key)
    else:
      row["status"] = "pending"
      for key in METRICS:
        row[key] = None
    row["train_s"] = _train_seconds(run_dir)
    rows.append(row)
  larger_better = METRICS[metric]

  def order(row):
    value = row[metric]
    if value is None or (isinstance(value, float) and math.isnan(value)):
      return (1, 0.0)
    return (0, -value if larger_better else value)

  rows.sort(key=order)
  columns = ["name", *keys, "status", *METRICS, "train_s"]
  with open(os.path.join(workdir, RESULTS_CSV), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
  with open(os.path.join(workdir, RESULTS_MD), "w") as f:
    f.write(markdown_table(rows, columns, split, metric, manifest["config"]))
  return rows


def _train_seconds(run_dir: str) -> float | None:
  """Sum of the epochs' training seconds in metrics.jsonl (None before any)."""
  path = os.path.join(run_dir, rundir.METRICS_FILE)
  if not os.path.exists(path):
    return None
  seconds = {}
  with open(path) as f:
    for line in f:
      record = json.loads(line)
      if record.get("event") == "epoch":
        seconds[record["epoch"]] = record["seconds"]  # a resumed epoch counts once
  return sum(seconds.values()) if seconds else None


def markdown_table(rows: list[dict], columns: list[str], split: str, metric: str,
                   config: str) -> str:
  direction = "descending" if METRICS[metric] else "ascending"
  lines = [f"# Sweep of {config}", "",
           f"Filtered ranking on the {split} split, sorted by {metric} ({direction}).", "",
           "| " + " | ".join(columns) + " |",
           "|" + "|".join("---:" if c in METRICS or c == "train_s" else "---"
                          for c in columns) + "|"]
  for row in rows:
    cells = []
    for column in columns:
      value = row[column]
      if value is None:
        cells.append("")
      elif column == "train_s":
        cells.append(f"{value:.1f}")
      elif column in METRICS:
        cells.append(f"{value:.2f}" if column == "mr" else f"{value:.4f}")
      else:
        cells.append(str(value))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _check_metric(metric: str) -> None:
  if metric not in METRICS:
    raise ValueError(f"--metric {metric!r} not in {sorted(METRICS)}")


def _say(message: str) -> None:
  print(f"[sweep] {message}", file=sys.stderr, flush=True)
