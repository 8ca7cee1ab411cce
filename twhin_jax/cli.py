"""The `twhin` command: a table of thin commands over the library.

  twhin demo     [--workdir DIR]                  generate, import, train, evaluate
  twhin import   --config FILE[:VARIANT] --workdir DIR
  twhin train    --config FILE[:VARIANT] --workdir DIR [--distributed]
                 [--warm-start RUN_DIR [--l2-to-previous ALPHA] [--new-entities neighbors]]
                 [--config.a.b=value ...]
  twhin eval     --workdir DIR [--split test] [--json] [--task retrieval --relation R --k 20]
  twhin export   --workdir DIR [--out DIR] [--projector [--sample N]]
  twhin index    --workdir DIR [--types T ...] [--rebuild]   ScaNN index per entity type
  twhin cluster  --workdir DIR --type T [--k K] [--top-m M]  k-means + per-user mixtures
  twhin sweep    --config FILE[:VARIANT] --workdir DIR [--metric mrr] [--split valid]
                 [--emit-commands | --collect]      the config's get_sweep() runs + table
  twhin drift    --old DIR --new DIR [--k 10] [--json]  per-entity change by degree, overlap@k
  twhin inspect  --workdir DIR [--neighbors TYPE:NAME] [--json] | --diff DIR_A DIR_B
  twhin compress --workdir DIR [--factors 4,8,16,32,64] [--json]   PQ codes + recall@10
  twhin serve    --workdir DIR [--port 8080] [--host 127.0.0.1] [--watch SECONDS]  HTTP JSON API
  twhin report   --out DIR [--budget small|full] [--data-dir DIR]  reproduction report (Markdown + PNGs)

Only import, train, sweep and demo build a config, so only they take
``--config.a.b=value`` overrides; every other command rejects unknown
arguments. A new command is one function here, registered with
``@command(...)`` and its arguments; it reads runs through ``rundir``.

The modules that load jax (or matplotlib) are imported inside the command
that uses them, each marked ``# lazy``: the CLI starts without jax (a test
checks it), and a command pays only for what it uses. The jax-free ones
(config, rundir, inspection, networks, sweep, reproduction_report) are
imported at the top.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from typing import Callable

from twhin_jax import config as config_lib
from twhin_jax import inspection
from twhin_jax import networks
from twhin_jax import reproduction_report
from twhin_jax import rundir
from twhin_jax import sweep

#: Errors that are the user's (bad input, missing files): a message and exit 2.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError)


def arg(*flags, **options) -> tuple[tuple, dict]:
  """One ``add_argument`` call, as data."""
  return flags, options


@dataclasses.dataclass(frozen=True)
class Command:
  name: str
  help: str
  run: Callable  # run(args, overrides)
  arguments: tuple = ()
  config_overrides: bool = False  # accepts --config.a.b=value


COMMANDS: dict[str, Command] = {}

WORKDIR = arg("--workdir", required=True, help="run directory")
QUIET = arg("--quiet", action="store_true", help="no progress bars")
JSON = arg("--json", action="store_true", help="print one JSON object")
CONFIG = arg("--config", required=True, help="configs/NAME.py[:variant]")


def command(name: str, help: str, *arguments, config_overrides: bool = False):
  """Registers ``run(args, overrides)`` as ``twhin NAME`` with its arguments."""
  def register(run):
    COMMANDS[name] = Command(name, help, run, arguments, config_overrides)
    return run
  return register


# --------------------------------------------------------------------------
# Building a graph and training.


@command("import", "import the config's edges into <workdir>/graph", CONFIG, WORKDIR, QUIET,
         config_overrides=True)
def cmd_import(args, overrides):
  from twhin_jax import train as train_lib  # lazy: jax (cli starts jax-free)
  config = config_lib.load_config(args.config, overrides)
  config_lib.validate(config)
  graph = train_lib.prepare_graph(config, args.workdir, progress=not args.quiet)
  print(json.dumps({"graph": graph.path, "counts": graph.manifest["counts"],
                    "entities": {t: e.count for t, e in graph.entities.items()},
                    "skipped": graph.manifest.get("skipped", {}),
                    "coverage": graph.manifest.get("coverage", {})}, indent=1))


@command("train", "train (or resume) a run", CONFIG, WORKDIR, QUIET,
         arg("--distributed", action="store_true",
             help="join a multi-process job (jax.distributed; see launch/README.md)"),
         arg("--warm-start", default="", metavar="RUN_DIR",
             help="start a new version from an earlier run (entities aligned by name)"),
         arg("--l2-to-previous", type=float, default=None, metavar="ALPHA",
             help="add ALPHA * |theta - theta_prev|^2 on the rows each step touches"),
         arg("--new-entities", choices=("random", "neighbors"), default="",
             help="initialisation of entities the earlier run lacks (default random)"),
         config_overrides=True)
def cmd_train(args, overrides):
  if args.distributed:
    from twhin_jax import distributed  # lazy: jax (cli starts jax-free)
    distributed.initialize()
  from twhin_jax import train as train_lib  # lazy: jax (cli starts jax-free)
  config = config_lib.load_config(args.config, overrides)
  if args.warm_start:
    config.warm_start.parent = args.warm_start
  if args.l2_to_previous is not None:
    config.warm_start.l2_to_previous = args.l2_to_previous
  if args.new_entities:
    config.warm_start.new_entities = args.new_entities
  started = time.perf_counter()
  if config.networks:  # one import, one run per network (networks.py)
    runs = train_lib.train_networks(config, args.workdir, progress=not args.quiet)
    print(f"trained {len(runs)} networks in {time.perf_counter() - started:.1f} s: "
          + ", ".join(f"{name} in {path}" for name, path in runs.items()))
    return
  trainer = train_lib.train(config, args.workdir, progress=not args.quiet)
  print(f"trained in {time.perf_counter() - started:.1f} s; history in "
        f"{os.path.join(args.workdir, rundir.METRICS_FILE)}")
  trainer.close()


@command("sweep", "run a config's get_sweep() and tabulate (docs/sweeps.md)",
         arg("--config", default=None, help="configs/NAME.py[:variant] with get_sweep()"),
         WORKDIR, QUIET,
         arg("--metric", default="mrr", help="sort key: mrr, mr, hits@1/3/10, auc"),
         arg("--split", default="valid", choices=config_lib.SPLITS),
         arg("--emit-commands", action="store_true",
             help="print one shell line per run (for a cluster) instead of running"),
         arg("--collect", action="store_true", help="tabulate finished runs only"),
         config_overrides=True)
def cmd_sweep(args, overrides):
  if args.collect:
    sweep.collect(args.workdir, split=args.split, metric=args.metric)
  elif not args.config:
    raise ValueError("--config is required (except with --collect)")
  elif args.emit_commands:
    print("\n".join(sweep.emit_commands(args.config, args.workdir, split=args.split,
                                        base_overrides=overrides)))
    return
  else:
    sweep.run_sweep(args.config, args.workdir, split=args.split, metric=args.metric,
                    base_overrides=overrides, progress=not args.quiet)
  with open(os.path.join(args.workdir, sweep.RESULTS_MD)) as f:
    print(f.read())


@command("demo", "generated Twitter-like graph: import, train, evaluate, report",
         arg("--workdir", default="runs/demo", help="run directory"), QUIET,
         arg("--variant", default="", help="config variant ('test': tiny)"),
         config_overrides=True)
def cmd_demo(args, overrides):
  from twhin_jax import demo  # lazy: jax (cli starts jax-free)
  config_path = os.path.join(os.path.dirname(__file__), "demo_config.py")
  config = config_lib.load_config(config_path + (f":{args.variant}" if args.variant else ""),
                                  overrides)
  demo.run_demo(config, args.workdir, progress=not args.quiet)


# --------------------------------------------------------------------------
# Reading a trained run (rundir.open_run; nothing in the run is rewritten).


@command("eval", "ranking metrics of a run's latest checkpoint", WORKDIR, QUIET,
         arg("--split", default="test", choices=config_lib.SPLITS), JSON,
         arg("--task", default="ranking", choices=("ranking", "retrieval"),
             help="ranking: link prediction; retrieval: Recall@K/NDCG@K of --relation over "
                  "all targets, known train edges excluded"),
         arg("--relation", default="", help="relation for --task retrieval"),
         arg("--k", type=int, default=20, help="list length for --task retrieval"))
def cmd_eval(args, overrides):
  from twhin_jax import evaluation  # lazy: jax (cli starts jax-free)
  from twhin_jax import run_report as reporting  # lazy: matplotlib
  run = rundir.open_run(args.workdir)
  progress = not (args.quiet or args.json)
  if args.task == "retrieval":  # Recall@K / NDCG@K over all candidates (recommendation_eval.py)
    from twhin_jax import model  # lazy: jax (cli starts jax-free)
    from twhin_jax import recommendation_eval  # lazy: jax (cli starts jax-free)
    if not args.relation:
      raise ValueError("--task retrieval needs --relation NAME")
    metrics = recommendation_eval.evaluate_retrieval(
        run.graph, run.all_embeddings(), run.relation_params(),
        model.RelationLayout.from_config(run.config), run.config, args.relation,
        split=args.split, k=args.k, progress=progress)
    with open(rundir.eval_file(args.workdir, f"{args.split}_retrieval_{args.relation}"), "w") as f:
      json.dump(metrics, f, indent=1)
    print(json.dumps(metrics))
    return
  metrics = evaluation.evaluate_run(run, args.split, progress=progress)
  with open(rundir.eval_file(args.workdir, args.split), "w") as f:
    json.dump(metrics, f, indent=1)
  if args.json:
    print(json.dumps(metrics))
  else:
    print(f"\n{evaluation.describe_ranking(metrics['ranking'])} on {args.split}\n")
    if metrics["edges_with_unseen_entities"]:
      print(f"{metrics['edges_with_unseen_entities']:,} {args.split} edges have an entity that "
            "never occurs in train (untrained vectors; data.drop_unseen_eval_entities drops "
            "them at import)\n")
    print(reporting.metrics_table(metrics))


@command("export", "write embeddings (Parquet, .npy), relation parameters, projector files",
         WORKDIR, QUIET,
         arg("--out", default=None, help="output directory (default <workdir>/export)"),
         arg("--projector", action="store_true",
             help="also write TensorBoard Embedding Projector files into <out>/projector"),
         arg("--sample", type=int, default=5000,
             help="entities per type in the projector files (0: all)"))
def cmd_export(args, overrides):
  from twhin_jax import export  # lazy: jax (cli starts jax-free)
  run = rundir.open_run(args.workdir)
  out = args.out or os.path.join(args.workdir, rundir.EXPORT_DIR)
  written = export.export_run(run, out)
  if args.projector:
    written["projector"] = export.write_projector(run.graph, run.all_embeddings(),
                                                  os.path.join(out, "projector"),
                                                  sample=args.sample)
  print(json.dumps(written, indent=1, default=str))


@command("index", "build (or reuse) one ScaNN index per entity type", WORKDIR, QUIET,
         arg("--types", nargs="*", default=None, help="entity types (default all)"),
         arg("--rebuild", action="store_true", help="rebuild even when fresh"))
def cmd_index(args, overrides):
  from twhin_jax import retrieval  # lazy: jax (cli starts jax-free)
  manifests = retrieval.build_indexes(args.workdir, args.types, rebuild=args.rebuild,
                                      progress=not args.quiet)
  print(json.dumps(manifests, indent=1))


@command("cluster", "k-means of a type's embeddings and every user's mixture", WORKDIR, QUIET,
         arg("--type", required=True, help="entity type to cluster (e.g. tweet)"),
         arg("--k", type=int, default=None, help="clusters (default ~sqrt(N/2))"),
         arg("--top-m", type=int, default=5, help="mixture components per user"),
         arg("--representative", default="centroid", choices=("centroid", "medoid")))
def cmd_cluster(args, overrides):
  from twhin_jax import mixture  # lazy: jax (cli starts jax-free)
  model = mixture.build_mixture(args.workdir, args.type, k=args.k, top_m=args.top_m,
                                representative=args.representative, progress=not args.quiet)
  print(json.dumps({k: v for k, v in model.info.items() if k != "cluster_sizes"}, indent=1))


@command("drift", "per-entity drift between two runs (by degree) and overlap@k", QUIET,
         arg("--old", required=True, help="run directory of the old version"),
         arg("--new", required=True, help="run directory of the new version"),
         arg("--k", type=int, default=10, help="neighbours for overlap@k"),
         arg("--sample", type=int, default=2000, help="entities per type for overlap@k"),
         arg("--metric", default="cos", choices=("cos", "dot", "l2")),
         arg("--out", default=None, help="plot/JSON folder (default <new>/plots)"), JSON)
def cmd_drift(args, overrides):
  from twhin_jax import drift  # lazy: jax (cli starts jax-free)
  report = drift.drift(args.old, args.new, k=args.k, sample=args.sample, metric=args.metric,
                       out_dir=args.out, progress=not (args.quiet or args.json))
  print(json.dumps(report) if args.json else drift.format_report(report))


@command("inspect", "versions, arrays, norms/NaNs, neighbours, diffs of a run",
         arg("--workdir", default="", help="run directory"), QUIET,
         arg("--neighbors", default=None, metavar="TYPE:NAME",
             help="nearest neighbours of one entity"),
         arg("--target-type", default=None, help="neighbours of this type (default same)"),
         arg("--k", type=int, default=10),
         arg("--metric", default="cos", choices=("cos", "dot", "l2")),
         arg("--diff", nargs=2, default=None, metavar=("DIR_A", "DIR_B"),
             help="leaf-by-leaf differences of two runs' latest checkpoints"),
         arg("--no-stats", action="store_true", help="skip the streamed norm/NaN pass"), JSON)
def cmd_inspect(args, overrides):
  if args.diff:
    diff = inspection.diff_runs(*args.diff)
    print(json.dumps(diff) if args.json else inspection.format_diff(diff))
  elif not args.workdir:
    raise ValueError("inspect needs --workdir DIR (or --diff DIR_A DIR_B)")
  elif args.neighbors:
    entity_type, name = inspection.parse_entity(args.neighbors)
    found = inspection.neighbors(args.workdir, entity_type, name, k=args.k,
                                 target_type=args.target_type, metric=args.metric)
    print(json.dumps(found) if args.json else "\n".join(
        f"{i + 1:>3}. {n['name']:<30} {n['score']:.4f}" for i, n in enumerate(found)))
  else:
    info = inspection.summary(args.workdir, with_stats=not args.no_stats)
    print(json.dumps(info, default=str) if args.json else inspection.format_summary(info))


@command("compress", "product quantization per type; recall@10 per factor", WORKDIR, QUIET,
         arg("--factors", default="4,8,16,32,64", help="compression factors, comma-separated"),
         arg("--k", type=int, default=10, help="recall@k"),
         arg("--json", action="store_true", help="print one JSON object per factor"))
def cmd_compress(args, overrides):
  from twhin_jax import compress  # lazy: jax (cli starts jax-free)
  try:
    factors = [float(f) if "." in f else int(f) for f in args.factors.split(",")]
  except ValueError:
    raise ValueError(f"--factors {args.factors!r}: expected numbers separated by commas") from None
  results = compress.compress_run(args.workdir, factors, k=args.k, progress=not (
      args.quiet or args.json))
  for result in results:
    print(json.dumps(result) if args.json else
          f"{result['factor']:>4}x  recall@{args.k} {result[f'recall_at_{args.k}']:.4f}  "
          f"({result['path']})")


@command("serve", "HTTP JSON API over a run (docs/serving.md)", WORKDIR, QUIET,
         arg("--port", type=int, default=8080),
         arg("--host", default="127.0.0.1"),
         arg("--watch", type=float, default=0.0, metavar="SECONDS",
             help="poll the latest checkpoint and reload when it changes (0: off)"),
         arg("--max-body", type=int, default=1 << 20, help="request body limit in bytes"))
def cmd_serve(args, overrides):
  from twhin_jax import serve  # lazy: jax (cli starts jax-free)
  logging.basicConfig(level=logging.INFO if not args.quiet else logging.WARNING)
  serve.serve(args.workdir, args.host, args.port, watch=args.watch, max_body=args.max_body,
              progress=not args.quiet)


@command("report", "run the paper's experiments at a budget; write DIR/report.md, PNG plots "
         "and results.json (docs/report/)",
         arg("--out", required=True, help="report folder (report.md, *.png, results.json)"),
         arg("--budget", default="small", choices=("small", "full"),
             help="small: d=64, 20 epochs, ~12 min on 2 cores; full: d=128, 50 epochs"),
         arg("--data-dir", default=None,
             help="datasets folder (default $TWHIN_DATA_DIR, else ../shared/data)"),
         arg("--runs-dir", default=None, help="embedding runs (default <out>/runs)"),
         arg("--sections", default="",
             help="comma-separated subset of who_to_follow,ablation,low_coverage,"
                  "networks,compression,drift (default all)"),
         arg("--seed", type=int, default=0),
         arg("--quiet", action="store_true", help="no progress bars (log lines only)"))
def cmd_report(args, overrides):
  del overrides
  sections = args.sections.split(",") if args.sections else reproduction_report.SECTIONS
  path = reproduction_report.run_report(args.out, budget=args.budget, data_dir=args.data_dir,
                                        runs_dir=args.runs_dir, seed=args.seed,
                                        progress=not args.quiet, sections=sections)
  print(path)


# --------------------------------------------------------------------------
# Dispatch.


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="twhin", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  for spec in COMMANDS.values():
    p = sub.add_parser(spec.name, help=spec.help, description=spec.help)
    for flags, options in spec.arguments:
      p.add_argument(*flags, **options)
    if spec.name in NETWORK_READERS:
      p.add_argument("--network", default="",
                     help="one network of a run that declares config.networks "
                          "(reads <workdir>/networks/NAME)")
  return parser


#: Commands that read a trained run, and so can read one network of it.
NETWORK_READERS = ("eval", "export", "index", "cluster", "drift", "inspect", "compress", "serve")


def resolve_network(args) -> None:
  """Points the run arguments of ``args`` at ``--network NAME``'s run directory."""
  for field in ("workdir", "old", "new"):
    workdir = getattr(args, field, None)
    if not workdir:
      continue
    path = networks.network_dir(workdir, args.network)
    if not os.path.isdir(path):
      found = sorted(os.listdir(os.path.join(workdir, networks.NETWORKS_DIR))) if os.path.isdir(
          os.path.join(workdir, networks.NETWORKS_DIR)) else []
      raise FileNotFoundError(f"{path}: no network {args.network!r} in {workdir} "
                              f"(networks there: {found or 'none'})")
    setattr(args, field, path)


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args, extra = parser.parse_known_args(argv)
  spec = COMMANDS[args.command]
  if extra and not spec.config_overrides:
    parser.error(f"{args.command}: unrecognized arguments: {' '.join(extra)}"
                 + (" (only import, train, sweep and demo take --config.* overrides)"
                    if any(e.startswith("--config.") for e in extra) else ""))
  stray = [e for e in extra if not e.startswith("--config.")]
  if stray:
    parser.error(f"{args.command}: unrecognized arguments: {' '.join(stray)} "
                 "(overrides look like --config.train.lr=0.05)")
  if hasattr(args, "quiet") and not sys.stderr.isatty():
    args.quiet = True  # progress bars only on a terminal (logs and CI get none)
  try:
    if getattr(args, "network", ""):
      resolve_network(args)
    spec.run(args, extra)
  except USER_ERRORS as err:
    print(f"twhin {args.command}: error: {err}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
