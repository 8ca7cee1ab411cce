"""The `twhin` command: thin wrappers over the library.

  twhin demo     [--workdir DIR]                  generate, import, train, evaluate
  twhin import   --config FILE[:VARIANT] --workdir DIR
  twhin train    --config FILE[:VARIANT] --workdir DIR [--distributed]
                 [--warm-start RUN_DIR [--l2-to-previous ALPHA] [--new-entities neighbors]]
                 [--config.a.b=value ...]
  twhin eval     --workdir DIR [--split test] [--json] [--task retrieval --relation R --k 20]
  twhin export   --workdir DIR [--out DIR]
  twhin index    --workdir DIR [--types T ...] [--rebuild]   ScaNN index per entity type
  twhin cluster  --workdir DIR --type T [--k K] [--top-m M]  k-means + per-user mixtures
  twhin sweep    --config FILE[:VARIANT] --workdir DIR [--metric mrr] [--split valid]
                 [--emit-commands | --collect]      the config's get_sweep() runs + table
  twhin drift    --old DIR --new DIR [--k 10] [--json]  per-entity change by degree, overlap@k
  twhin inspect  --workdir DIR [--neighbors TYPE:NAME] [--json] | --diff DIR_A DIR_B
  twhin compress --workdir DIR [--factors 4,8,16,32,64] [--json]   PQ codes + recall@10
  twhin serve    --workdir DIR [--port 8080] [--host 127.0.0.1] [--watch SECONDS]  HTTP JSON API
  twhin report   --out DIR [--budget small|full] [--data-dir DIR]  reproduction report (Markdown + PNGs)
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import sys
import time


def load_config(spec: str, overrides: list[str] = ()):
  """Builds a config from ``path/to/config.py[:variant]`` plus overrides.

  Overrides look like ``--config.train.lr=0.05``; values are Python literals
  when they parse as one, else strings.
  """
  path, _, variant = spec.partition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such config file")
  module_spec = importlib.util.spec_from_file_location(f"twhin_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(variant) if variant else module.get_config()
  for item in overrides:
    if not item.startswith("--config."):
      raise ValueError(f"unrecognised argument {item!r} (overrides look like --config.train.lr=0.05)")
    dotted, sep, raw = item[len("--config."):].partition("=")
    if not sep:
      raise ValueError(f"{item!r}: expected --config.FIELD=VALUE")
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw
    node = config
    *parents, leaf = dotted.split(".")
    for name in parents:
      if name not in node:
        raise ValueError(f"--config.{dotted}: unknown field {name!r}")
      node = node[name]
    if leaf not in node:
      raise ValueError(f"--config.{dotted}: unknown field {leaf!r}")
    current = node[leaf]
    if isinstance(current, float) and isinstance(value, int):
      value = float(value)
    node[leaf] = value
  return config


def _print_metrics(metrics: dict, title: str) -> None:
  from twhin_jax import reporting
  print(f"\n{title}\n")
  print(reporting.metrics_table(metrics))


def cmd_import(args, overrides):
  from twhin_jax import config as config_lib
  from twhin_jax import train as train_lib
  config = load_config(args.config, overrides)
  config_lib.validate(config)
  graph = train_lib.prepare_graph(config, args.workdir, progress=not args.quiet)
  print(json.dumps({"graph": graph.path, "counts": graph.manifest["counts"],
                    "entities": {t: e.count for t, e in graph.entities.items()},
                    "skipped": graph.manifest.get("skipped", {})}, indent=1))


def cmd_train(args, overrides):
  if args.distributed:
    from twhin_jax import distributed
    distributed.initialize()
  from twhin_jax import train as train_lib
  config = load_config(args.config, overrides)
  if args.warm_start:
    config.warm_start.parent = args.warm_start
  if args.l2_to_previous is not None:
    config.warm_start.l2_to_previous = args.l2_to_previous
  if args.new_entities:
    config.warm_start.new_entities = args.new_entities
  started = time.perf_counter()
  trainer = train_lib.train(config, args.workdir, progress=not args.quiet)
  print(f"trained in {time.perf_counter() - started:.1f} s; history in "
        f"{os.path.join(args.workdir, train_lib.METRICS_FILE)}")
  trainer.close()


def _open_trainer(workdir: str, quiet: bool):
  from twhin_jax import train as train_lib
  if not os.path.exists(os.path.join(workdir, train_lib.CONFIG_FILE)):
    raise FileNotFoundError(f"{workdir}: no run here (expected {train_lib.CONFIG_FILE})")
  config = train_lib.load_run_config(workdir)
  return train_lib.Trainer(config, workdir, progress=not quiet)


def cmd_eval(args, overrides):
  del overrides
  trainer = _open_trainer(args.workdir, args.quiet or args.json)
  if args.task == "retrieval":  # Recall@K / NDCG@K over all candidates (recommendation_eval.py)
    from twhin_jax import recommendation_eval
    if not args.relation:
      raise ValueError("--task retrieval needs --relation NAME")
    metrics = recommendation_eval.evaluate_retrieval(
        trainer.graph, trainer.embeddings(), trainer.rel_state["params"], trainer.layout,
        trainer.config, args.relation, split=args.split, k=args.k,
        progress=not (args.quiet or args.json))
    args.split = f"{args.split}_retrieval_{args.relation}"  # names the JSON file below
  else:
    metrics = trainer.evaluate(args.split, progress=not (args.quiet or args.json))
  trainer.close()
  with open(os.path.join(args.workdir, f"eval_{args.split}.json"), "w") as f:
    json.dump(metrics, f, indent=1)
  if args.json or args.task == "retrieval":
    print(json.dumps(metrics))
  else:
    _print_metrics(metrics, f"Filtered ranking on {args.split}")


def cmd_export(args, overrides):
  del overrides
  from twhin_jax import export
  trainer = _open_trainer(args.workdir, args.quiet)
  out = args.out or os.path.join(args.workdir, "export")
  written = export.export_embeddings(trainer.graph, trainer.embeddings(),
                                     trainer.rel_state["params"], trainer.layout, out)
  trainer.close()
  print(json.dumps(written, indent=1, default=str))


def cmd_index(args, overrides):
  del overrides
  from twhin_jax import retrieval
  manifests = retrieval.build_indexes(args.workdir, args.types, rebuild=args.rebuild,
                                      progress=not args.quiet)
  print(json.dumps(manifests, indent=1))


def cmd_cluster(args, overrides):
  del overrides
  from twhin_jax import mixture
  model = mixture.build_mixture(args.workdir, args.type, k=args.k, top_m=args.top_m,
                                representative=args.representative, progress=not args.quiet)
  print(json.dumps({k: v for k, v in model.info.items() if k != "cluster_sizes"}, indent=1))


def cmd_sweep(args, overrides):
  from twhin_jax import sweep
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


def cmd_drift(args, overrides):
  del overrides
  from twhin_jax import drift
  report = drift.drift(args.old, args.new, k=args.k, sample=args.sample, metric=args.metric,
                       out_dir=args.out, progress=not (args.quiet or args.json))
  print(json.dumps(report) if args.json else drift.format_report(report))


def cmd_inspect(args, overrides):
  del overrides
  from twhin_jax import inspection
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


def cmd_compress(args, overrides):
  del overrides
  from twhin_jax import compress
  factors = [float(f) if "." in f else int(f) for f in args.factors.split(",")]
  results = compress.compress_run(args.workdir, factors, k=args.k, progress=not (
      args.quiet or args.json))
  for result in results:
    print(json.dumps(result) if args.json else
          f"{result['factor']:>4}x  recall@{args.k} {result[f'recall_at_{args.k}']:.4f}  "
          f"({result['path']})")


def cmd_serve(args, overrides):
  del overrides
  import logging
  from twhin_jax import serve
  logging.basicConfig(level=logging.INFO if not args.quiet else logging.WARNING)
  serve.serve(args.workdir, args.host, args.port, watch=args.watch, max_body=args.max_body,
              progress=not args.quiet)


def cmd_report(args, overrides):
  del overrides
  from twhin_jax import report
  sections = args.sections.split(",") if args.sections else report.SECTIONS
  path = report.run_report(args.out, budget=args.budget, data_dir=args.data_dir,
                           runs_dir=args.runs_dir, seed=args.seed, progress=not args.quiet,
                           sections=sections)
  print(path)


def cmd_demo(args, overrides):
  from twhin_jax import demo
  config_path = os.path.join(os.path.dirname(__file__), "demo_config.py")
  config = load_config(config_path + (f":{args.variant}" if args.variant else ""), overrides)
  demo.run_demo(config, args.workdir, progress=not args.quiet)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="twhin", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)

  def add(name, func, help_text, config=False, workdir_default=None):
    p = sub.add_parser(name, help=help_text)
    if config:
      p.add_argument("--config", required=True, help="configs/NAME.py[:variant]")
    p.add_argument("--workdir", required=workdir_default is None, default=workdir_default,
                   help="run directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=func)
    return p

  add("import", cmd_import, "import the config's edges into <workdir>/graph", config=True)
  p = add("train", cmd_train, "train (or resume) a run", config=True)
  p.add_argument("--distributed", action="store_true",
                 help="join a multi-process job (jax.distributed; see launch/README.md)")
  p.add_argument("--warm-start", default="", metavar="RUN_DIR",
                 help="start a new version from an earlier run (entities aligned by name)")
  p.add_argument("--l2-to-previous", type=float, default=None, metavar="ALPHA",
                 help="add ALPHA * |theta - theta_prev|^2 on the rows each step touches")
  p.add_argument("--new-entities", choices=("random", "neighbors"), default="",
                 help="initialisation of entities the earlier run lacks (default random)")
  p = add("eval", cmd_eval, "filtered ranking metrics of a run")
  p.add_argument("--split", default="test", choices=("train", "valid", "test"))
  p.add_argument("--json", action="store_true", help="print one JSON object")
  p.add_argument("--task", default="ranking", choices=("ranking", "retrieval"),
                 help="ranking: filtered link prediction; retrieval: Recall@K/NDCG@K of "
                      "--relation over all targets, known train edges excluded")
  p.add_argument("--relation", default="", help="relation for --task retrieval")
  p.add_argument("--k", type=int, default=20, help="list length for --task retrieval")
  p = add("export", cmd_export, "write embeddings (Parquet, .npy) and relation parameters")
  p.add_argument("--out", default=None, help="output directory (default <workdir>/export)")
  p = add("index", cmd_index, "build (or reuse) one ScaNN index per entity type")
  p.add_argument("--types", nargs="*", default=None, help="entity types (default all)")
  p.add_argument("--rebuild", action="store_true", help="rebuild even when fresh")
  p = add("cluster", cmd_cluster, "k-means of a type's embeddings and every user's mixture")
  p.add_argument("--type", required=True, help="entity type to cluster (e.g. tweet)")
  p.add_argument("--k", type=int, default=None, help="clusters (default ~sqrt(N/2))")
  p.add_argument("--top-m", type=int, default=5, help="mixture components per user")
  p.add_argument("--representative", default="centroid", choices=("centroid", "medoid"))
  p = add("sweep", cmd_sweep, "run a config's get_sweep() and tabulate (docs/sweeps.md)")
  p.add_argument("--config", default=None, help="configs/NAME.py[:variant] with get_sweep()")
  p.add_argument("--metric", default="mrr", help="sort key: mrr, mr, hits@1/3/10, auc")
  p.add_argument("--split", default="valid", choices=("train", "valid", "test"))
  p.add_argument("--emit-commands", action="store_true",
                 help="print one shell line per run (for a cluster) instead of running")
  p.add_argument("--collect", action="store_true", help="tabulate finished runs only")
  p = add("drift", cmd_drift, "per-entity drift between two runs (by degree) and overlap@k",
          workdir_default="")
  p.add_argument("--old", required=True, help="run directory of the old version")
  p.add_argument("--new", required=True, help="run directory of the new version")
  p.add_argument("--k", type=int, default=10, help="neighbours for overlap@k")
  p.add_argument("--sample", type=int, default=2000, help="entities per type for overlap@k")
  p.add_argument("--metric", default="cos", choices=("cos", "dot", "l2"))
  p.add_argument("--out", default=None, help="plot/JSON folder (default <new>/plots)")
  p.add_argument("--json", action="store_true", help="print one JSON object")
  p = add("inspect", cmd_inspect, "versions, arrays, norms/NaNs, neighbours, diffs of a run",
          workdir_default="")
  p.add_argument("--neighbors", default=None, metavar="TYPE:NAME",
                 help="nearest neighbours of one entity")
  p.add_argument("--target-type", default=None, help="neighbours of this type (default same)")
  p.add_argument("--k", type=int, default=10)
  p.add_argument("--metric", default="cos", choices=("cos", "dot", "l2"))
  p.add_argument("--diff", nargs=2, default=None, metavar=("DIR_A", "DIR_B"),
                 help="leaf-by-leaf differences of two runs' latest checkpoints")
  p.add_argument("--no-stats", action="store_true", help="skip the streamed norm/NaN pass")
  p.add_argument("--json", action="store_true", help="print one JSON object")
  p = add("compress", cmd_compress, "product quantization per type; recall@10 per factor")
  p.add_argument("--factors", default="4,8,16,32,64", help="compression factors, comma-separated")
  p.add_argument("--k", type=int, default=10, help="recall@k")
  p.add_argument("--json", action="store_true", help="print one JSON object per factor")
  p = add("serve", cmd_serve, "HTTP JSON API over a run (docs/serving.md)")
  p.add_argument("--port", type=int, default=8080)
  p.add_argument("--host", default="127.0.0.1")
  p.add_argument("--watch", type=float, default=0.0, metavar="SECONDS",
                 help="poll the latest checkpoint and reload when it changes (0: off)")
  p.add_argument("--max-body", type=int, default=1 << 20, help="request body limit in bytes")
  p = sub.add_parser("report", help="run the paper's experiments at a budget; write "
                     "DIR/report.md, PNG plots and results.json (docs/report/)")
  p.add_argument("--out", required=True, help="report folder (report.md, *.png, results.json)")
  p.add_argument("--budget", default="small", choices=("small", "full"),
                 help="small: d=64, 20 epochs, ~12 min on 2 cores; full: d=128, 50 epochs")
  p.add_argument("--data-dir", default=None,
                 help="datasets folder (default $TWHIN_DATA_DIR, else ../shared/data)")
  p.add_argument("--runs-dir", default=None, help="embedding runs (default <out>/runs)")
  p.add_argument("--sections", default="",
                 help="comma-separated subset of ablation,heterogeneity,compression,drift,"
                      "link_prediction (default all)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--quiet", action="store_true", help="no progress bars (log lines only)")
  p.set_defaults(func=cmd_report)
  p = add("demo", cmd_demo, "generated Twitter-like graph: import, train, evaluate, report",
          workdir_default="runs/demo")
  p.add_argument("--variant", default="", help="config variant ('test': tiny)")

  args, overrides = parser.parse_known_args(argv)
  try:
    args.func(args, overrides)
  except (ValueError, FileNotFoundError, FileExistsError, KeyError) as err:
    print(f"twhin {args.command}: error: {err}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
