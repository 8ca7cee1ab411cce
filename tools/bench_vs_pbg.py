#!/usr/bin/env python
"""twhin-jax against PyTorch-BigGraph on the same graph with the same settings.

Both systems train the same train edges (translation operator, dot comparator,
logistic loss, chunks of 50 edges with 50 batch + 50 uniform negatives, batch
1000, row-wise Adagrad with the same lr for entities and relations, same
dimension, epochs and partitions), then BOTH are evaluated with OUR filtered
ranking (twhin_jax.evaluation) on the test split, head and tail, ties
averaged. Every graph runs at every partition count of --partitions (default
1,4). Prints a table per (graph, P) and a summary table of all of them (or one
JSON object per (graph, P) with --json, the tables on stderr):
edges/s, training wall time, peak memory of the whole process tree (sampled
with psutil every 0.5 s: summed RSS, and summed PSS, which counts memory
shared by PBG's Hogwild workers once), MRR, Hits@10, and ours/PBG ratios.

  python tools/bench_vs_pbg.py --json                             # both graphs, P = 1 and 4
  python tools/bench_vs_pbg.py --graphs fb15k237 --partitions 1   # needs $TWHIN_DATA_DIR
  python tools/bench_vs_pbg.py --graphs powerlaw10m               # 1M nodes, 10M edges
  python tools/bench_vs_pbg.py --quick                            # tiny smoke test of both

The power-law graph (powerlaw10m) has planted communities
(twhin_jax.generate.power_law_communities: node v is in community v mod 100;
80% of the edges stay in the source's community), so a model that learns
the structure ranks the test edges well above chance and both systems' MRR
compares something.

PyTorch-BigGraph runs in its own virtual environment (default .bench/pbg-venv,
created on first use: torch==2.13.0 CPU, torchbiggraph==1.0.0,
setuptools<81 because PBG imports pkg_resources), in subprocesses of this
script (``--phase pbg-*``), which never import jax; our side never imports
torch or h5py. Phases, each its own process so memory is measured per system:

  ours-import  import the graph (our importer; not timed)
  pbg-write    write PBG's input layout from our imported buckets (not timed):
               entity_count_<type>_<p>.txt, entity_names_<type>_<p>.json,
               edges_<i>_<j>.h5 (lhs, rhs, rel int64 datasets, attribute
               format_version = 1), dynamic_rel_count.txt with reciprocal
               relations. The same train edges in the same partitions: PBG's
               own TSV importer reads one line at a time in Python (~38 s for
               FB15k-237, far longer at 10M edges) and would hold out nothing
               different.
  ours-train   twhin_jax.train.train (timed: the call, after imports)
  pbg-train    torchbiggraph.train.train, 2 Hogwild workers (timed likewise)
  ours-eval    our filtered ranking of our embeddings
  pbg-export   PBG's checkpoint (h5) -> .npy embeddings + names + relation params
  pbg-eval     our filtered ranking of PBG's embeddings, mapped to our ids by name

edges/s = epochs x train edges / training seconds, for both systems (so it
includes start-up work inside the train call: our table initialisation and
jit compilation, PBG's model and edge loading). Our train phase runs with a
fresh, empty compilation cache ($TWHIN_JAX_CACHE_DIR), so every program is
compiled inside the timed call, as on a first run; ours_last_epoch_edges_per_s
is our steady state (tools/bench_train.py's number).

Scoring conventions (exact, not approximate). Ours: f(s, r, t) =
(theta_s + theta_r) . theta_t. PBG applies the operator to the right-hand
side. Two relation modes (--relations):

  single      PBG one relation per name, rhs operator: f_PBG(s, r, t) =
              theta_s . (theta_t + t_r). That is our model on the reversed
              edge (t, r, s): (theta_t + t_r) . theta_s. So PBG's
              embeddings and translations are evaluated with our code on a
              reversed view of the graph (every split's src/dst swapped;
              head and tail queries swap roles, the set of ranks is the
              same; we report head/tail in the original orientation). Ours
              trains with model.reciprocal = False.
  reciprocal  PBG dynamic relations: every relation has an lhs operator g_r
              and an rhs operator h_r; tail corruption scores
              (theta_s + g_r) . theta_t', head corruption theta_s' .
              (theta_t + h_r). That is exactly our model.reciprocal = True
              with forward rows g_r and reverse rows h_r (model.py eq. 1').
              Ours trains with model.reciprocal = True.

Default: reciprocal for FB15k-237 (PBG's own FB15k recipe uses dynamic
relations; a single direction of translation + dot cannot rank heads by
relation), single for the power-law graph (tools/bench_train.py's setting).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_PBG_VENV = os.path.join(REPO, ".bench", "pbg-venv")
PBG_PACKAGES = ["torch==2.13.0", "torchbiggraph==1.0.0", "setuptools<81"]
PBG_FORMAT_VERSION = 1  # torchbiggraph.graph_storages.FORMAT_VERSION
#: twhin_jax.train.COMPILATION_CACHE_ENV (this script's PBG phases never import twhin_jax).
COMPILATION_CACHE_ENV = "TWHIN_JAX_CACHE_DIR"

#: Graph presets: (default dim, default epochs, default relation mode).
GRAPHS = {
    "fb15k237": dict(dim=200, epochs=10, relations="reciprocal"),
    "powerlaw10m": dict(dim=128, epochs=2, relations="single", nodes=1_000_000,
                        edges=10_000_000, num_relations=4, test_fraction=0.001,
                        max_triples=2000, communities=100, community_affinity=0.8),
}
QUICK = {
    "fb15k237": dict(epochs=1, dim=32, max_triples=500),
    "powerlaw10m": dict(epochs=1, dim=32, nodes=5000, edges=50_000, test_fraction=0.01,
                        max_triples=300, communities=20),
}


def log(message: str) -> None:
  print(f"[bench_vs_pbg {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Settings shared by both systems.


def parse_partitions(text: str) -> list[int]:
  """``"1,4"`` -> [1, 4]."""
  try:
    values = [int(t) for t in text.split(",") if t.strip()]
  except ValueError:
    raise ValueError(f"--partitions {text!r}: expected comma-separated integers, e.g. 1,4") from None
  if not values or min(values) < 1:
    raise ValueError(f"--partitions {text!r}: expected integers >= 1, e.g. 1,4")
  return values


def settings_for(args, graph: str, partitions: int) -> dict:
  preset = dict(GRAPHS[graph])
  if args.quick:
    preset.update(QUICK[graph])
  if graph == "powerlaw10m":
    preset["nodes"] = args.nodes or preset["nodes"]
    preset["edges"] = args.edges or preset["edges"]
  return dict(
      graph=graph,
      dim=args.dim or preset["dim"],
      epochs=args.epochs or preset["epochs"],
      relations=preset["relations"] if args.relations == "auto" else args.relations,
      partitions=partitions,
      lr=args.lr,
      workers=args.workers,
      devices=args.devices,
      batch_size=1000,
      num_batch_negs=50,
      num_uniform_negs=50,
      init_scale=1e-3,
      quick=bool(args.quick),
      nodes=preset.get("nodes"),
      edges=preset.get("edges"),
      num_relations=preset.get("num_relations"),
      communities=preset.get("communities"),
      community_affinity=preset.get("community_affinity", 0.8),
      test_fraction=preset.get("test_fraction", 0.0),
      max_triples=preset.get("max_triples", 0),
  )


def our_config(settings: dict, graph_file: str | None):
  """Our config matching PBG's settings (see the module docstring)."""
  if settings["graph"] == "fb15k237":
    from twhin_jax import config_builders
    config = config_builders.kg_config("fb15k237", "$TWHIN_DATA_DIR/kg/fb15k-237", suffix=".txt.gz",
                                operator="translation", loss="logistic",
                                reciprocal=settings["relations"] == "reciprocal",
                                dim=settings["dim"], lr=settings["lr"], epochs=settings["epochs"])
    config.entities.entity.num_partitions = settings["partitions"]
  else:
    sys.path.insert(0, HERE)
    import bench_train  # noqa: E402 - tools/ is not a package
    config = bench_train.bench_config(graph_file, settings["partitions"], settings["dim"],
                                      settings["epochs"], settings["num_relations"])
    config.data.test_fraction = settings["test_fraction"]
    config.model.reciprocal = settings["relations"] == "reciprocal"
  config.name = f"vs-pbg-{settings['graph']}"
  config.model.dim = settings["dim"]
  config.model.comparator = "dot"
  config.model.init_scale = settings["init_scale"]
  config.train.epochs = settings["epochs"]
  config.train.loss = "logistic"
  config.train.lr = settings["lr"]
  config.train.relation_lr = settings["lr"]
  config.train.batch_size = settings["batch_size"]
  config.train.bucket_order = "inside_out"  # PBG's default
  config.train.checkpoint_every_buckets = 0
  config.train.eval_every_epochs = 0
  config.negatives.chunk_size = settings["num_batch_negs"]
  config.negatives.num_uniform = settings["num_uniform_negs"]
  # PBG with dynamic relations fills a chunk with edges of every relation;
  # ours does the same with mix_relations (single-relation chunks would give
  # a relation's few popular answers as most of its batch negatives).
  config.negatives.mix_relations = bool(config.model.reciprocal)
  config.eval.filtered = True
  config.eval.num_sampled_negatives = 0
  config.eval.max_triples = settings["max_triples"]
  devices = settings.get("devices", 1)
  if devices > 1:
    # One CPU device per core, as PBG runs one Hogwild worker per core; the
    # tournament keeps every row on one device at a time, so no row gets two
    # devices' updates summed (docs/architecture.md).
    config.mesh.num_devices = devices
    config.mesh.schedule = "tournament"
  return config


def our_environment(settings: dict) -> dict:
  """Environment of our train and eval phases: ``devices`` CPU devices in
  the one process (XLA's host platform, one per core when devices = cores)."""
  devices = settings.get("devices", 1)
  if devices <= 1:
    return {}
  flag = f"--xla_force_host_platform_device_count={devices}"
  return {"XLA_FLAGS": " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), flag])),
          "JAX_PLATFORMS": "cpu"}


def pbg_config(settings: dict, graph_manifest: dict, data_dir: str, run_dir: str) -> dict:
  """PBG's config dict (torchbiggraph.config.ConfigSchema fields)."""
  schema = graph_manifest["schema"]
  entities = {name: {"num_partitions": int(e["num_partitions"])}
              for name, e in schema["entities"].items()}
  relations = schema["relations"]
  dynamic = settings["relations"] == "reciprocal"
  if dynamic:
    types = {(r["source"], r["target"]) for r in relations}
    if len(types) != 1:
      raise ValueError("reciprocal (PBG dynamic relations) needs one (source, target) type pair")
    lhs, rhs = types.pop()
    pbg_relations = [dict(name="all_edges", lhs=lhs, rhs=rhs, operator="translation")]
  else:
    pbg_relations = [dict(name=r["name"], lhs=r["source"], rhs=r["target"],
                          operator="translation") for r in relations]
  return dict(
      entity_path=data_dir,
      edge_paths=[os.path.join(data_dir, "train")],
      checkpoint_path=os.path.join(run_dir, "checkpoint"),
      entities=entities,
      relations=pbg_relations,
      dynamic_relations=dynamic,
      dimension=settings["dim"],
      init_scale=settings["init_scale"],
      comparator="dot",
      global_emb=False,  # PBG adds a learned per-type vector by default; ours has none
      loss_fn="logistic",
      lr=settings["lr"],
      relation_lr=settings["lr"],
      num_epochs=settings["epochs"],
      batch_size=settings["batch_size"],
      num_batch_negs=settings["num_batch_negs"],
      num_uniform_negs=settings["num_uniform_negs"],
      workers=settings["workers"],
      bucket_order="inside_out",
      eval_fraction=0.0,  # train on every edge (PBG holds out 5% by default)
      verbose=0,
  )


# ---------------------------------------------------------------------------
# PBG's input layout (runs in the PBG venv: numpy + h5py, no twhin_jax).


def write_names_for_pbg(graph_dir: str, out_dir: str) -> None:
  """Entity names as text for write_pbg_layout (the PBG venv has no pyarrow
  to read our Parquet vocabulary); runs in our venv."""
  from twhin_jax.graph import Graph
  graph = Graph(graph_dir)
  os.makedirs(out_dir, exist_ok=True)
  for name in graph.entities:
    with open(os.path.join(out_dir, f"names_{name}.txt"), "w", encoding="utf-8") as f:
      f.writelines(n + "\n" for n in graph.names(name))


def write_pbg_layout(graph_dir: str, out_dir: str, dynamic: bool) -> dict:
  """Writes PBG's entity and edge files from one of our imported graphs.

  Our local id of an entity in partition p is p * S + offset (S = ceil(count
  / P)) and PBG's is (p, offset): the same partitioning, so the bucket files
  carry over unchanged. Names go to entity_names_<type>_<p>.json so that
  PBG's embeddings map back to our ids by name. Returns counts.
  """
  import h5py
  import numpy as np
  with open(os.path.join(graph_dir, "manifest.json")) as f:
    manifest = json.load(f)
  schema = manifest["schema"]
  os.makedirs(os.path.join(out_dir, "train"), exist_ok=True)
  counts = {}
  for name, entity in schema["entities"].items():
    count, parts = int(entity["count"]), int(entity["num_partitions"])
    size = max(1, -(-count // parts))
    with open(os.path.join(out_dir, f"names_{name}.txt"), encoding="utf-8") as f:
      names = [line.rstrip("\n") for line in f]  # from write_names_for_pbg
    for p in range(parts):
      part_names = names[p * size:min(count, (p + 1) * size)]
      with open(os.path.join(out_dir, f"entity_count_{name}_{p}.txt"), "w") as f:
        f.write(f"{len(part_names)}\n")
      with open(os.path.join(out_dir, f"entity_names_{name}_{p}.json"), "w") as f:
        json.dump(part_names, f)
    counts[name] = count
  relations = schema["relations"]
  if dynamic:
    with open(os.path.join(out_dir, "dynamic_rel_count.txt"), "w") as f:
      f.write(f"{len(relations)}\n")
    with open(os.path.join(out_dir, "dynamic_rel_names.json"), "w") as f:
      json.dump([r["name"] for r in relations], f)
  lhs_parts = max(int(schema["entities"][r["source"]]["num_partitions"]) for r in relations)
  rhs_parts = max(int(schema["entities"][r["target"]]["num_partitions"]) for r in relations)
  total = 0
  for i in range(lhs_parts):
    for j in range(rhs_parts):
      bucket = os.path.join(graph_dir, "buckets", f"{i}_{j}")
      if os.path.exists(os.path.join(bucket, "src.npy")):
        arrays = {key: np.load(os.path.join(bucket, f"{ours}.npy")).astype(np.int64)
                  for key, ours in (("lhs", "src"), ("rhs", "dst"), ("rel", "rel"))}
      else:
        arrays = {key: np.zeros(0, np.int64) for key in ("lhs", "rhs", "rel")}
      path = os.path.join(out_dir, "train", f"edges_{i}_{j}.h5")
      with h5py.File(path + ".tmp", "w") as hf:
        hf.attrs["format_version"] = PBG_FORMAT_VERSION
        for key, data in arrays.items():
          hf.create_dataset(key, data=data)
      os.replace(path + ".tmp", path)
      total += len(arrays["rel"])
  return {"entities": counts, "edges": total, "buckets": [lhs_parts, rhs_parts]}


def export_pbg_checkpoint(run_dir: str, data_dir: str, config: dict, out_dir: str) -> dict:
  """PBG's trained embeddings and translations -> .npy + names (PBG venv)."""
  import h5py
  import numpy as np
  checkpoint = config["checkpoint_path"]
  with open(os.path.join(checkpoint, "checkpoint_version.txt")) as f:
    version = int(f.read().strip())
  os.makedirs(out_dir, exist_ok=True)
  for name, entity in config["entities"].items():
    tables, names = [], []
    for p in range(entity["num_partitions"]):
      with h5py.File(os.path.join(checkpoint, f"embeddings_{name}_{p}.v{version}.h5"), "r") as hf:
        tables.append(hf["embeddings"][...])
      with open(os.path.join(data_dir, f"entity_names_{name}_{p}.json")) as f:
        names.extend(json.load(f))
    np.save(os.path.join(out_dir, f"embeddings_{name}.npy"), np.concatenate(tables))
    with open(os.path.join(out_dir, f"names_{name}.json"), "w") as f:
      json.dump(names, f)
  params = {}
  with h5py.File(os.path.join(checkpoint, f"model.v{version}.h5"), "r") as hf:
    hf["model"].visititems(lambda key, obj: params.__setitem__(key, obj[...])
                           if isinstance(obj, h5py.Dataset) else None)
  out = {}
  if config["dynamic_relations"]:
    with open(os.path.join(data_dir, "dynamic_rel_names.json")) as f:
      rel_names = json.load(f)
    lhs = _find_param(params, "operator/lhs/", "translations")
    rhs = _find_param(params, "operator/rhs/", "translations")
    np.save(os.path.join(out_dir, "forward.npy"), lhs)   # g_r: [R, d]
    np.save(os.path.join(out_dir, "reverse.npy"), rhs)   # h_r: [R, d]
  else:
    rel_names = [r["name"] for r in config["relations"]]
    rows = [_find_param(params, f"relations/{k}/operator/rhs/", "translation")
            for k in range(len(rel_names))]
    np.save(os.path.join(out_dir, "rhs.npy"), np.stack(rows))  # t_r: [R, d]
  with open(os.path.join(out_dir, "relations.json"), "w") as f:
    json.dump(rel_names, f)
  out["version"] = version
  out["param_keys"] = sorted(params)
  return out


def _find_param(params: dict, *parts: str):
  """The one checkpoint parameter whose key contains every part."""
  hits = [k for k in params if all(p in k for p in parts)]
  if len(hits) != 1:
    raise KeyError(f"expected one PBG parameter matching {parts}, got {hits} "
                   f"(all: {sorted(params)})")
  return params[hits[0]]


# ---------------------------------------------------------------------------
# Our evaluation of PBG's embeddings.


class ReversedGraph:
  """A graph view with every edge reversed: (s, r, t) -> (t, r, s).

  PBG's single-direction model on (s, r, t) is our model on (t, r, s) (see
  the module docstring); our evaluation then ranks exactly PBG's scores.
  """

  def __init__(self, graph):
    import dataclasses
    self._graph = graph
    self.relations = [dataclasses.replace(r, source=r.target, target=r.source)
                      for r in graph.relations]

  def split_edges(self, split: str) -> dict:
    edges = self._graph.split_edges(split)
    return {"src": edges["dst"], "dst": edges["src"], "rel": edges["rel"]}

  def __getattr__(self, name):
    return getattr(self._graph, name)


def evaluate_pbg(workdir: str, export_dir: str, mode: str, progress: bool) -> dict:
  import numpy as np
  from twhin_jax import evaluation
  from twhin_jax import model
  from twhin_jax import rundir
  config = rundir.load_config(workdir)
  graph = rundir.open_graph(workdir)
  embeddings, missing = {}, {}
  for name, info in graph.entities.items():
    table = np.load(os.path.join(export_dir, f"embeddings_{name}.npy"))
    with open(os.path.join(export_dir, f"names_{name}.json")) as f:
      names = json.load(f)
    ours = np.zeros((info.count, table.shape[1]), np.float32)
    seen = np.zeros(info.count, bool)
    index = {n: i for i, n in enumerate(graph.names(name))}
    ids = np.fromiter((index[n] for n in names), np.int64, len(names))
    ours[ids] = table
    seen[ids] = True
    embeddings[name] = ours
    missing[name] = int((~seen).sum())  # entities PBG never saw keep zeros
  with open(os.path.join(export_dir, "relations.json")) as f:
    pbg_rel_names = json.load(f)
  pbg_row = {n: k for k, n in enumerate(pbg_rel_names)}
  config.model.reciprocal = mode == "reciprocal"
  layout = model.RelationLayout.from_config(config)
  params = {g: np.array(p) for g, p in layout.init_params().items()}
  if mode == "reciprocal":
    forward = np.load(os.path.join(export_dir, "forward.npy"))
    reverse = np.load(os.path.join(export_dir, "reverse.npy"))
    for r, name in enumerate(layout.names):
      params[layout.group[r]][layout.row[r]] = forward[pbg_row[name]]
      params[layout.group[r]][layout.reverse_row[r]] = reverse[pbg_row[name]]
    view = graph
  else:
    rhs = np.load(os.path.join(export_dir, "rhs.npy"))
    for r, name in enumerate(layout.names):
      params[layout.group[r]][layout.row[r]] = rhs[pbg_row[name]]
    view = ReversedGraph(graph)
  metrics = evaluation.evaluate(view, embeddings, params, layout, config, "test",
                                progress=progress)
  if mode != "reciprocal":  # report head/tail in the original orientation
    metrics["head"], metrics["tail"] = metrics["tail"], metrics["head"]
  metrics["missing_entities"] = missing
  return metrics


def patch_pbg_schema() -> None:
  """Makes PBG 1.0.0's config schema accept Optional[...] fields on Python 3.11.

  Its ``unpack_optional`` tests ``type_ is Optional[arg]`` (object identity),
  which fails for the annotations attrs resolved, so loading or dumping any
  config raises "Unknown type: typing.Optional[float]". Compare by value.
  """
  import typing
  from torchbiggraph import schema

  def unpack_optional(type_):
    args = typing.get_args(type_)
    if typing.get_origin(type_) is typing.Union and len(args) == 2 and type(None) in args:
      return args[0] if args[1] is type(None) else args[1]
    raise TypeError("Not an optional type")

  schema.unpack_optional = unpack_optional


# ---------------------------------------------------------------------------
# Phases (each in its own process).


def phase(args) -> None:
  settings = json.loads(args.settings)
  result: dict = {}
  if args.phase == "ours-import":
    from twhin_jax import train as train_lib
    config = our_config(settings, args.graph_file)
    graph = train_lib.prepare_graph(config, args.workdir, progress=not args.json)
    result = {"edges": graph.num_edges("train"), "test": graph.num_edges("test")}
  elif args.phase == "ours-train":
    from twhin_jax import train as train_lib
    config = our_config(settings, args.graph_file)
    started = time.perf_counter()
    trainer = train_lib.train(config, args.workdir, progress=not args.json)
    seconds = time.perf_counter() - started
    last = trainer.history[-1]
    result = {"train_seconds": seconds, "edges": trainer.graph.num_edges("train"),
              "last_epoch_edges_per_s": last["edges"] / last["seconds"]}
    trainer.close()
  elif args.phase == "ours-eval":
    from twhin_jax import evaluation
    from twhin_jax import rundir
    result = evaluation.evaluate_run(rundir.open_run(args.workdir), "test",
                                     max_triples=settings["max_triples"], progress=False)
  elif args.phase == "pbg-write":
    result = write_pbg_layout(args.graph_dir, args.pbg_data,
                              dynamic=settings["relations"] == "reciprocal")
  elif args.phase == "pbg-train":
    from torchbiggraph.config import parse_config
    from torchbiggraph.train import train
    from torchbiggraph.util import SubprocessInitializer, setup_logging
    patch_pbg_schema()
    with open(os.path.join(args.pbg_run, "config.json")) as f:
      config = parse_config(json.load(f))
    setup_logging(config.verbose)
    subprocess_init = SubprocessInitializer()
    subprocess_init.register(setup_logging, config.verbose)
    started = time.perf_counter()
    train(config, subprocess_init=subprocess_init)
    result = {"train_seconds": time.perf_counter() - started}
  elif args.phase == "pbg-export":
    with open(os.path.join(args.pbg_run, "config.json")) as f:
      config = json.load(f)
    result = export_pbg_checkpoint(args.pbg_run, args.pbg_data, config,
                                   os.path.join(args.pbg_run, "export"))
  elif args.phase == "pbg-eval":
    result = evaluate_pbg(args.workdir, os.path.join(args.pbg_run, "export"),
                          settings["relations"], progress=False)
  print(json.dumps(result), flush=True)


class TreeMemory:
  """Peak summed RSS and PSS (MiB) of a process and all its descendants."""

  def __init__(self, pid: int, interval: float = 0.5):
    import psutil
    self.psutil = psutil
    self.root = psutil.Process(pid)
    self.interval = interval
    self.peak_rss = self.peak_pss = 0.0
    self.stop = threading.Event()
    self.thread = threading.Thread(target=self._run, daemon=True)
    self.thread.start()

  def _sample(self) -> None:
    rss = pss = 0
    try:
      procs = [self.root] + self.root.children(recursive=True)
    except self.psutil.Error:
      return
    for proc in procs:
      try:
        info = proc.memory_full_info()
        rss += info.rss
        pss += getattr(info, "pss", info.rss)
      except self.psutil.Error:
        continue
    self.peak_rss = max(self.peak_rss, rss / 2 ** 20)
    self.peak_pss = max(self.peak_pss, pss / 2 ** 20)

  def _run(self) -> None:
    while not self.stop.is_set():
      self._sample()
      self.stop.wait(self.interval)

  def close(self) -> dict:
    self.stop.set()
    self.thread.join()
    return {"peak_rss_mib": self.peak_rss, "peak_pss_mib": self.peak_pss}


def fresh_compilation_cache(root: str) -> dict:
  """The environment of our train phase: a fresh, empty compilation cache
  under ``root``, so every program the train call runs is compiled inside
  the timed call, as on a first run (twhin_jax turns the persistent cache
  on by default, and a cache warm from an earlier run would hide it)."""
  cache = os.path.join(root, "ours-compilation-cache")
  shutil.rmtree(cache, ignore_errors=True)
  return {COMPILATION_CACHE_ENV: cache}


def run_phase(python: str, name: str, common: list[str], measure: bool = False,
              quiet: bool = False, env_extra: dict | None = None) -> dict:
  """Runs one phase in a subprocess; returns its JSON (plus memory peaks)."""
  started = time.perf_counter()
  log(f"{name} ...")
  env = dict(os.environ, **(env_extra or {}))
  env.setdefault("PYTHONWARNINGS", "ignore::UserWarning")  # PBG's pkg_resources warning
  proc = subprocess.Popen([python, os.path.abspath(__file__), "--phase", name, *common],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL if quiet else None,
                          text=True, env=env)
  memory = TreeMemory(proc.pid) if measure else None
  out, _ = proc.communicate()
  peaks = memory.close() if memory else {}
  if proc.returncode != 0:
    raise RuntimeError(f"phase {name} failed with exit status {proc.returncode}")
  result = json.loads(out.strip().splitlines()[-1])
  result.update(peaks)
  log(f"{name} done in {time.perf_counter() - started:.1f} s")
  return result


def ensure_pbg_venv(venv: str) -> str:
  """The PBG venv's python, creating the venv on first use."""
  python = os.path.join(venv, "bin", "python")
  check = [python, "-W", "ignore", "-c", "import torchbiggraph, h5py, numpy"]
  if os.path.exists(python) and subprocess.run(check, capture_output=True).returncode == 0:
    return python
  log(f"creating {venv} with {' '.join(PBG_PACKAGES)} (a few minutes)")
  subprocess.run([sys.executable, "-m", "venv", "--clear", venv], check=True)
  subprocess.run([python, "-m", "pip", "install", "-q", *PBG_PACKAGES], check=True)
  subprocess.run(check, check=True)
  return python


def bench_graph(args, graph: str, partitions: int, pbg_python: str, scratch: str) -> dict:
  settings = settings_for(args, graph, partitions)
  size = (f"-{settings['nodes']}n{settings['edges']}e{settings['communities']}c"
          if graph == "powerlaw10m" else "")
  tag = f"{graph}{size}-p{settings['partitions']}-{settings['relations']}" + (
      "-quick" if settings["quick"] else "")
  root = os.path.join(scratch, tag)
  import_dir = os.path.join(root, "import")
  graph_file = None
  if graph == "powerlaw10m":
    from twhin_jax import generate
    graph_file = os.path.join(
        scratch, f"power_law_{settings['nodes']}_{settings['edges']}_"
                 f"{settings['communities']}c{settings['community_affinity']}.tsv")
    if not os.path.exists(graph_file):
      log(f"generating {settings['edges']:,} edges over {settings['nodes']:,} nodes in "
          f"{settings['communities']} communities")
      generate.power_law_communities(
          graph_file + ".tmp.tsv", num_nodes=settings["nodes"], num_edges=settings["edges"],
          num_relations=settings["num_relations"], num_communities=settings["communities"],
          community_affinity=settings["community_affinity"], seed=0, progress=not args.json)
      os.replace(graph_file + ".tmp.tsv", graph_file)
  elif not os.environ.get("TWHIN_DATA_DIR"):
    raise SystemExit("fb15k237 needs TWHIN_DATA_DIR (the datasets folder, e.g. ../shared/data)")
  common = ["--settings", json.dumps(settings)] + (["--json"] if args.json else [])
  if graph_file:
    common += ["--graph-file", graph_file]
  graph_dir = os.path.join(import_dir, "graph")
  if not os.path.exists(os.path.join(graph_dir, "manifest.json")):
    run_phase(sys.executable, "ours-import", common + ["--workdir", import_dir])
  with open(os.path.join(graph_dir, "manifest.json")) as f:
    manifest = json.load(f)

  # Ours: a fresh run directory sharing the imported graph.
  ours_dir = os.path.join(root, "ours")
  shutil.rmtree(ours_dir, ignore_errors=True)
  os.makedirs(ours_dir)
  os.symlink(os.path.abspath(graph_dir), os.path.join(ours_dir, "graph"))
  ours = run_phase(sys.executable, "ours-train", common + ["--workdir", ours_dir], measure=True,
                   env_extra={**fresh_compilation_cache(root), **our_environment(settings)})
  ours_metrics = run_phase(sys.executable, "ours-eval", common + ["--workdir", ours_dir],
                           env_extra=our_environment(settings))

  # PBG: its input layout once, a fresh checkpoint directory per run.
  pbg_data = os.path.join(root, "pbg-data")
  pbg_run = os.path.join(root, "pbg-run")
  pbg_common = common + ["--workdir", ours_dir, "--graph-dir", graph_dir, "--pbg-data", pbg_data,
                         "--pbg-run", pbg_run]
  if not os.path.exists(os.path.join(pbg_data, "written.json")):
    shutil.rmtree(pbg_data, ignore_errors=True)
    write_names_for_pbg(graph_dir, pbg_data)
    written = run_phase(pbg_python, "pbg-write", pbg_common)
    with open(os.path.join(pbg_data, "written.json"), "w") as f:
      json.dump(written, f)
  shutil.rmtree(pbg_run, ignore_errors=True)
  os.makedirs(pbg_run)
  with open(os.path.join(pbg_run, "config.json"), "w") as f:
    json.dump(pbg_config(settings, manifest, pbg_data, pbg_run), f, indent=1)
  pbg = run_phase(pbg_python, "pbg-train", pbg_common, measure=True, quiet=args.json)
  run_phase(pbg_python, "pbg-export", pbg_common)
  pbg_metrics = run_phase(sys.executable, "pbg-eval", pbg_common)

  edges = int(manifest["counts"]["train"])
  epochs = settings["epochs"]
  row = {
      "graph": graph, "edges": edges, "test_triples": int(manifest["counts"]["test"]),
      "eval_triples": ours_metrics["count"] // 2, "epochs": epochs, "dim": settings["dim"],
      "partitions": settings["partitions"], "relations": settings["relations"],
      "lr": settings["lr"], "pbg_workers": settings["workers"],
      "ours_devices": settings["devices"],
      "ours_train_s": ours["train_seconds"], "pbg_train_s": pbg["train_seconds"],
      "ours_edges_per_s": epochs * edges / ours["train_seconds"],
      "pbg_edges_per_s": epochs * edges / pbg["train_seconds"],
      "ours_last_epoch_edges_per_s": ours["last_epoch_edges_per_s"],
      "ours_peak_rss_mib": ours["peak_rss_mib"], "pbg_peak_rss_mib": pbg["peak_rss_mib"],
      "ours_peak_pss_mib": ours["peak_pss_mib"], "pbg_peak_pss_mib": pbg["peak_pss_mib"],
      "ours_mrr": ours_metrics["mrr"], "pbg_mrr": pbg_metrics["mrr"],
      "ours_hits@10": ours_metrics["hits@10"], "pbg_hits@10": pbg_metrics["hits@10"],
      "ours_head_mrr": ours_metrics["head"]["mrr"], "ours_tail_mrr": ours_metrics["tail"]["mrr"],
      "pbg_head_mrr": pbg_metrics["head"]["mrr"], "pbg_tail_mrr": pbg_metrics["tail"]["mrr"],
      "pbg_missing_entities": pbg_metrics["missing_entities"],
  }
  row["ratio_edges_per_s"] = row["ours_edges_per_s"] / row["pbg_edges_per_s"]
  row["ratio_peak_rss"] = row["ours_peak_rss_mib"] / max(row["pbg_peak_rss_mib"], 1e-9)
  row["ratio_peak_pss"] = row["ours_peak_pss_mib"] / max(row["pbg_peak_pss_mib"], 1e-9)
  row["ratio_mrr"] = row["ours_mrr"] / max(row["pbg_mrr"], 1e-12)
  return row


def print_table(row: dict, file=None) -> None:
  out = functools.partial(print, file=file or sys.stdout)
  out(f"\n{row['graph']}: {row['edges']:,} train edges, d={row['dim']}, {row['epochs']} epochs, "
        f"P={row['partitions']}, relations {row['relations']}, lr {row['lr']}, "
        f"filtered test ranking of {row['eval_triples']:,} triples (head + tail)\n")
  out("| | twhin-jax | PyTorch-BigGraph | ours / PBG |")
  out("|---|---:|---:|---:|")
  lines = [
      ("edges/s (epochs x edges / train s)", "edges_per_s", "{:,.0f}"),
      ("train wall s", "train_s", "{:.1f}"),
      ("peak RSS MiB (process tree, summed)", "peak_rss_mib", "{:,.0f}"),
      ("peak PSS MiB (process tree)", "peak_pss_mib", "{:,.0f}"),
      ("MRR", "mrr", "{:.4f}"),
      ("Hits@10", "hits@10", "{:.4f}"),
      ("head MRR", "head_mrr", "{:.4f}"),
      ("tail MRR", "tail_mrr", "{:.4f}"),
  ]
  for label, key, fmt in lines:
    ours, pbg = row[f"ours_{key}"], row[f"pbg_{key}"]
    ratio = ours / pbg if pbg else float("nan")
    out(f"| {label} | {fmt.format(ours)} | {fmt.format(pbg)} | {ratio:.2f} |")
  out(f"\n(our steady-state last epoch: {row['ours_last_epoch_edges_per_s']:,.0f} edges/s)")


def print_summary(rows: list[dict], file=None) -> None:
  """One line per (graph, P): issue 12's table."""
  out = functools.partial(print, file=file or sys.stdout)
  out("\n| graph | P | twhin-jax edges/s | PBG edges/s | ratio | MRR ours / PBG | "
      "peak RSS MiB ours / PBG |")
  out("|---|---:|---:|---:|---:|---|---|")
  for r in rows:
    out(f"| {r['graph']} | {r['partitions']} | {r['ours_edges_per_s']:,.0f} "
        f"(last epoch {r['ours_last_epoch_edges_per_s']:,.0f}) | {r['pbg_edges_per_s']:,.0f} | "
        f"{r['ratio_edges_per_s']:.2f} | {r['ours_mrr']:.4f} / {r['pbg_mrr']:.4f} | "
        f"{r['ours_peak_rss_mib']:,.0f} / {r['pbg_peak_rss_mib']:,.0f} |")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--graphs", default="fb15k237,powerlaw10m",
                      help=f"comma-separated, from {sorted(GRAPHS)}")
  parser.add_argument("--epochs", type=int, default=0, help="default: per graph (10, 2)")
  parser.add_argument("--dim", type=int, default=0, help="default: per graph (200, 128)")
  parser.add_argument("--partitions", default="1,4",
                      help="comma-separated partition counts, each run on every graph")
  parser.add_argument("--nodes", type=int, default=0, help="powerlaw10m: nodes (default 1M)")
  parser.add_argument("--edges", type=int, default=0, help="powerlaw10m: edges (default 10M)")
  parser.add_argument("--lr", type=float, default=0.1, help="entities and relations, both systems")
  parser.add_argument("--workers", type=int, default=2, help="PBG Hogwild workers")
  parser.add_argument("--devices", type=int, default=1,
                      help="our CPU devices in one process (XLA host platform; the "
                           "tournament schedule when > 1)")
  parser.add_argument("--relations", choices=("auto", "single", "reciprocal"), default="auto")
  parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
  parser.add_argument("--dir", default=None,
                      help="scratch directory (default .bench/vs-pbg; imports are reused)")
  parser.add_argument("--pbg-venv", default=DEFAULT_PBG_VENV)
  parser.add_argument("--json", action="store_true", help="one JSON object per (graph, P)")
  # internal: one phase in its own process
  parser.add_argument("--phase", help=argparse.SUPPRESS)
  for name in ("settings", "graph-file", "graph-dir", "workdir", "pbg-data", "pbg-run"):
    parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.phase:
    phase(args)
    return
  graphs = [g for g in args.graphs.split(",") if g]
  unknown = sorted(set(graphs) - set(GRAPHS))
  if unknown:
    parser.error(f"unknown graphs {unknown}; choose from {sorted(GRAPHS)}")
  try:
    partition_counts = parse_partitions(args.partitions)
  except ValueError as e:
    parser.error(str(e))
  scratch = os.path.abspath(args.dir or os.path.join(REPO, ".bench", "vs-pbg"))
  os.makedirs(scratch, exist_ok=True)
  pbg_python = ensure_pbg_venv(args.pbg_venv)
  rows = []
  for graph in graphs:
    for partitions in partition_counts:
      row = bench_graph(args, graph, partitions, pbg_python, scratch)
      rows.append(row)
      if args.json:
        print(json.dumps(row), flush=True)
        print_table(row, file=sys.stderr)  # the table too, away from the JSON
      else:
        print_table(row)
  print_summary(rows, file=sys.stderr if args.json else None)


if __name__ == "__main__":
  main()
