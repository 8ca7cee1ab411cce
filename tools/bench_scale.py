#!/usr/bin/env python
"""Import and training at scale: peak memory and speed against graph size.

Generates power-law graphs (twhin_jax.generate.power_law, streamed to a TSV
in chunks of a million edges, so generating takes bounded memory), imports
each (twhin_jax.train.prepare_graph) and trains it (twhin_jax.train.train)
with P partitions, each phase in its own process so its peak RSS is its own
(the process tree's RSS sampled with psutil every 0.5 s, and the process's
own ru_maxrss; the larger is reported):

  python tools/bench_scale.py                                # 10M, 100M, 500M edges
  python tools/bench_scale.py --sizes 1e7:1e6:4              # one row: E:V[:P]
  python tools/bench_scale.py --sizes 2e4:2e3:2 --json --dir /tmp/scale

Every row but the largest trains one full epoch; the largest trains
--max-buckets buckets (64) of its P x P, or all of them if there are fewer.
Model: translation + dot, logistic loss, chunks of 50 edges with 50 batch +
50 uniform negatives, batch 1000, row Adagrad lr 0.1 (tools/bench_train.py's
settings), d = --dim (128).

The largest row is meant to have tables larger than this machine's RAM: its
d is raised to the smallest multiple of 8 for which V x (d + 1) x 4 bytes
(embeddings plus the Adagrad accumulator) exceeds RAM, unless that d is
above --max-dim (then the graph is too small for that and d stays). The
disk must hold the input TSV and the importer's files while importing, then
the imported edges and both table slots (2 x V x (d + 1) x 4; a checkpoint
never overwrites the slot it committed) while training; the input is deleted
after the import unless --keep. `df` is checked first, and when the largest
row does not fit in 90% of the free space, d goes back to --dim, then edges
and entities are scaled down together until it does; the choice and the
reason are printed. Rows run one at a time and each row's files are deleted
after it, so the disk needs the largest row only.

Columns: edges, entities, P, d, import s, import edges/s, import peak RSS,
train edges/s (trained edges / summed bucket seconds: loading, swapping and
training; the train call's wall time, which adds table initialisation and
compilation, is train_s in --json), train peak RSS, its bound
2 x ceil(V/P) x (d + 1) x 4 bytes + 1.5 GiB (issue 11: the two resident
partitions, their Adagrad state and a fixed budget), the full tables' size,
and the disk the row used (du of its input and run directory, the larger of
after import and after training).

A row can run in two stages: --stage import generates and imports it and
keeps its run directory (with the import's columns in
bench_scale_import.json); --stage train, with the same --sizes and --dir,
trains it later and records the whole row. The 500M-edge import takes about
an hour on 2 cores, so the training code can change in between.

Every finished row is appended to --results (JSON lines; default
<dir>/bench_scale.jsonl), and the table, --json and the PNG (--plot, peak RSS
against edges, with the bound) show every row of that file, so the large
rows can be run later into the same file (docs/scale/bench_scale.jsonl).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from bench_vs_pbg import TreeMemory  # noqa: E402 - tools/ is not a package

MIB = 2 ** 20
GIB = 2 ** 30
DEFAULT_SIZES = "1e7:1e6:4,1e8:1e7:16,5e8:5e7:32"
NUM_RELATIONS = 4
#: Fixed memory budget of the training process beyond the two resident
#: partitions (JAX runtime, batch buffers): issue 11's target.
FIXED_BUDGET_BYTES = 1.5 * GIB
#: Imported edges on disk per edge, planned: src, dst, rel as int32 in the
#: bucket files (measured 13.6 B/edge at 10M edges, docs/scale.md) ...
IMPORTED_BYTES_PER_EDGE = 16
#: ... and while importing, twice that for the importer's intermediate files.
IMPORTING_BYTES_PER_EDGE = 32
#: Fraction of the free disk a plan may use.
DISK_MARGIN = 0.9


def log(message: str) -> None:
  print(f"[bench_scale {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Sizes and the plan.


def parse_sizes(text: str) -> list[dict]:
  """``"1e7:1e6:4,1e8:1e7"`` -> [{edges, entities, partitions (None: auto)}]."""
  rows = []
  for item in (t.strip() for t in text.split(",")):
    if not item:
      continue
    parts = item.split(":")
    if len(parts) not in (2, 3):
      raise ValueError(f"--sizes item {item!r}: expected EDGES:ENTITIES[:P], e.g. 1e7:1e6:4")
    try:
      values = [float(p) for p in parts]
    except ValueError:
      raise ValueError(f"--sizes item {item!r}: not numbers") from None
    if any(v != int(v) or v < 1 for v in values):
      raise ValueError(f"--sizes item {item!r}: every field must be a whole number >= 1")
    edges, entities = int(values[0]), int(values[1])
    rows.append(dict(edges=edges, entities=entities,
                     partitions=int(values[2]) if len(values) == 3 else None))
  if not rows:
    raise ValueError("--sizes is empty")
  return rows


def default_partitions(entities: int) -> int:
  """P so a partition holds at most ~2M rows (a power of two, at least 1)."""
  return 1 << max(0, math.ceil(math.log2(max(1.0, entities / 2e6))))


def tables_bytes(entities: int, dim: int) -> int:
  """Full tables: embeddings plus the row Adagrad accumulator, float32."""
  return entities * (dim + 1) * 4


def rss_bound_bytes(entities: int, partitions: int, dim: int) -> float:
  """Issue 11's target: two resident partitions with Adagrad, plus 1.5 GiB."""
  return 2 * math.ceil(entities / partitions) * (dim + 1) * 4 + FIXED_BUDGET_BYTES


def input_bytes(edges: int, entities: int) -> int:
  """Size of the generated TSV: ``n<id>\\tr<k>\\tn<id>\\n`` per edge (ids at most)."""
  digits = len(str(max(entities - 1, 0)))
  return edges * (2 * (1 + digits) + 2 + 3)


def disk_bytes(edges: int, entities: int, dim: int, keep_input: bool = False) -> int:
  """Peak disk of a row: max(importing, training)."""
  importing = input_bytes(edges, entities) + IMPORTING_BYTES_PER_EDGE * edges
  training = (IMPORTED_BYTES_PER_EDGE * edges + 2 * tables_bytes(entities, dim)
              + (input_bytes(edges, entities) if keep_input else 0))
  return max(importing, training)


def plan_rows(sizes: list[dict], dim: int, max_dim: int, free_bytes: int, ram_bytes: int,
              max_buckets: int) -> tuple[list[dict], list[str]]:
  """Per row: edges, entities, partitions, dim, buckets to train (None: an
  epoch). Returns (rows, notes): the notes say what was chosen and why."""
  notes = []
  budget = int(free_bytes * DISK_MARGIN)
  largest = max(range(len(sizes)), key=lambda i: (sizes[i]["edges"], sizes[i]["entities"]))
  rows = []
  for i, size in enumerate(sizes):
    row = dict(size)
    row["partitions"] = row["partitions"] or default_partitions(row["entities"])
    row["dim"] = dim
    row["max_buckets"] = None
    if i == largest:
      row["max_buckets"] = max_buckets
      # Smallest d (multiple of 8) whose tables exceed RAM: V (d + 1) 4 > RAM.
      over_ram = 8 * (math.floor(ram_bytes / (4 * row["entities"]) - 1) // 8 + 1)
      if over_ram <= max_dim:
        if over_ram > dim:
          row["dim"] = over_ram
          notes.append(f"largest row: d={over_ram} so its tables "
                       f"({tables_bytes(row['entities'], over_ram) / GIB:.1f} GiB) exceed RAM "
                       f"({ram_bytes / GIB:.1f} GiB)")
        else:
          notes.append(f"largest row: its tables at d={dim} "
                       f"({tables_bytes(row['entities'], dim) / GIB:.1f} GiB) already exceed RAM "
                       f"({ram_bytes / GIB:.1f} GiB)")
      else:
        notes.append(f"largest row: tables above RAM would need d={over_ram} > --max-dim "
                     f"{max_dim}; d stays {dim}")
      need = disk_bytes(row["edges"], row["entities"], row["dim"])
      if need > budget:
        wanted = dict(edges=row["edges"], entities=row["entities"], dim=row["dim"])
        while row["dim"] > dim and disk_bytes(row["edges"], row["entities"], row["dim"]) > budget:
          row["dim"] -= 8
        scale = 1.0
        while disk_bytes(int(row["edges"] * scale), int(row["entities"] * scale),
                         row["dim"]) > budget and scale > 1e-3:
          scale *= 0.9
        row["edges"] = int(row["edges"] * scale)
        row["entities"] = int(row["entities"] * scale)
        notes.append(
            f"disk: {wanted['edges']:,} edges, {wanted['entities']:,} entities at "
            f"d={wanted['dim']} need ~{need / GIB:.1f} GiB (imported edges + two table slots, "
            f"or input + importer files) but {DISK_MARGIN:.0%} of the free {free_bytes / GIB:.1f} GiB is "
            f"{budget / GIB:.1f} GiB: running {row['edges']:,} edges, {row['entities']:,} "
            f"entities at d={row['dim']} instead (tables "
            f"{tables_bytes(row['entities'], row['dim']) / GIB:.1f} GiB)")
    elif disk_bytes(row["edges"], row["entities"], row["dim"]) > budget:
      raise SystemExit(f"{row['edges']:,} edges need ~"
                       f"{disk_bytes(row['edges'], row['entities'], row['dim']) / GIB:.1f} GiB of "
                       f"disk; only {free_bytes / GIB:.1f} GiB free")
    rows.append(row)
  return rows, notes


# ---------------------------------------------------------------------------
# Phases, each in its own process.


def scale_config(graph_file: str, row: dict):
  import bench_train  # noqa: E402 - tools/ is not a package
  config = bench_train.bench_config(graph_file, row["partitions"], row["dim"], 1, NUM_RELATIONS)
  config.name = f"scale-{row['edges']}e-p{row['partitions']}"
  return config


def phase(args) -> None:
  row = json.loads(args.row)
  if args.phase == "generate":
    from twhin_jax import generate
    tmp = args.graph_file + ".tmp.tsv"
    generate.power_law(tmp, num_nodes=row["entities"], num_edges=row["edges"],
                       num_relations=NUM_RELATIONS, seed=0, progress=False)
    os.replace(tmp, args.graph_file)
    result = {"input_bytes": os.path.getsize(args.graph_file)}
  elif args.phase == "import":
    from twhin_jax import train as train_lib
    graph = train_lib.prepare_graph(scale_config(args.graph_file, row), args.workdir,
                                    progress=False)
    # Ids no edge drew are absent from the import.
    result = {"train_edges": graph.num_edges("train"),
              "entities_imported": sum(e.count for e in graph.entities.values())}
  elif args.phase == "train":
    from twhin_jax import train as train_lib
    config = scale_config(args.graph_file, row)
    # From scratch: another run on this graph (tools/rss_timeline.py) leaves
    # tables, checkpoints and bucket records that would be resumed or counted.
    import bench_train  # noqa: E402 - tools/ is not a package
    bench_train.remove_training_state(args.workdir)
    started = time.perf_counter()
    trainer = train_lib.train(config, args.workdir, progress=False,
                              stop_after_buckets=row["max_buckets"])
    wall = time.perf_counter() - started
    trainer.close()
    buckets = []
    with open(os.path.join(args.workdir, train_lib.METRICS_FILE)) as f:
      for line in f:
        record = json.loads(line)
        if "bucket_index" in record:
          buckets.append(record)
    result = {"train_s": wall, "buckets": len(buckets),
              "trained_edges": sum(b["edges"] for b in buckets),
              "bucket_s": sum(b["seconds"] for b in buckets)}
  else:
    raise SystemExit(f"unknown phase {args.phase!r}")
  print(json.dumps(result), flush=True)


def run_phase(name: str, row: dict, graph_file: str, workdir: str) -> dict:
  """Runs one phase in a subprocess: its JSON, seconds and peak RSS (MiB)."""
  command = [sys.executable, os.path.abspath(__file__), "--phase", name, "--row", json.dumps(row),
             "--graph-file", graph_file, "--workdir", workdir]
  env = dict(os.environ)
  env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  log(f"{name}: {row['edges']:,} edges, {row['entities']:,} entities, P={row['partitions']}, "
      f"d={row['dim']}")
  with tempfile.TemporaryFile("w+") as out:
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=out, env=env)
    memory = TreeMemory(proc.pid)
    _, status, usage = os.wait4(proc.pid, 0)  # ru_maxrss of this child (KiB on Linux)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    peaks = memory.close()
    out.seek(0)
    text = out.read()
  if proc.returncode != 0:
    raise RuntimeError(f"phase {name} failed with exit status {proc.returncode}")
  result = json.loads(text.strip().splitlines()[-1])
  result["seconds"] = seconds
  result["peak_rss_mib"] = max(peaks["peak_rss_mib"], usage.ru_maxrss / 1024)
  log(f"{name}: {seconds:,.1f} s, peak RSS {result['peak_rss_mib']:,.0f} MiB")
  return result


def du_bytes(*paths: str) -> int:
  total = 0
  for path in paths:
    if os.path.isfile(path):
      total += os.lstat(path).st_blocks * 512
      continue
    for root, _, files in os.walk(path):
      for name in files:
        try:
          total += os.lstat(os.path.join(root, name)).st_blocks * 512
        except FileNotFoundError:
          continue
  return total


#: The import half of a row, kept in its run directory by --stage import so
#: --stage train can finish the row later (with newer training code, or after
#: an interruption) without importing again.
IMPORTED_ROW_FILE = "bench_scale_import.json"


def import_row(row: dict, graph_file: str, workdir: str, keep: bool) -> dict:
  """Generates (unless the input exists) and imports one row: its columns."""
  shutil.rmtree(workdir, ignore_errors=True)
  out = dict(edges=row["edges"], entities=row["entities"], partitions=row["partitions"],
             dim=row["dim"], relations=NUM_RELATIONS)
  if not os.path.exists(graph_file):
    generated = run_phase("generate", row, graph_file, workdir)
    out.update(generate_s=generated["seconds"], generate_peak_rss_mib=generated["peak_rss_mib"])
  out["input_mib"] = os.path.getsize(graph_file) / MIB
  imported = run_phase("import", row, graph_file, workdir)
  out.update(import_s=imported["seconds"], import_edges_per_s=row["edges"] / imported["seconds"],
             import_peak_rss_mib=imported["peak_rss_mib"],
             entities_imported=imported["entities_imported"],
             imported_mib=du_bytes(os.path.join(workdir, "graph")) / MIB,
             disk_after_import_mib=du_bytes(graph_file, workdir) / MIB,
             imported=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
  if not keep:  # training reads the imported buckets only
    os.remove(graph_file)
  with open(os.path.join(workdir, IMPORTED_ROW_FILE), "w") as f:
    json.dump(out, f)
  return out


def bench_row(row: dict, scratch: str, keep: bool, stage: str = "all") -> dict | None:
  """One row: import then train (stage "all"), or either half ("import" keeps
  the run directory for a later "train", which reads the import's columns)."""
  tag = f"{row['edges']}e_{row['entities']}v"
  graph_file = os.path.join(scratch, f"power_law_{tag}.tsv")
  workdir = os.path.join(scratch, f"run_{tag}_p{row['partitions']}_d{row['dim']}")
  if stage == "train":
    recorded = os.path.join(workdir, IMPORTED_ROW_FILE)
    if not os.path.exists(recorded):
      raise SystemExit(f"--stage train: {recorded} is missing; run --stage import for this row first")
    with open(recorded) as f:
      out = json.load(f)
  else:
    out = import_row(row, graph_file, workdir, keep)
    if stage == "import":
      return None
  disk_after_import = out.pop("disk_after_import_mib") * MIB
  trained = run_phase("train", row, graph_file, workdir)
  out.update(train_s=trained["train_s"], train_process_s=trained["seconds"],
             buckets_trained=trained["buckets"], buckets_total=row["partitions"] ** 2,
             trained_edges=trained["trained_edges"],
             train_edges_per_s=trained["trained_edges"] / max(trained["bucket_s"], 1e-9),
             train_wall_edges_per_s=trained["trained_edges"] / max(trained["train_s"], 1e-9),
             train_peak_rss_mib=trained["peak_rss_mib"],
             rss_bound_mib=rss_bound_bytes(row["entities"], row["partitions"], row["dim"]) / MIB,
             tables_mib=tables_bytes(row["entities"], row["dim"]) / MIB,
             tables_on_disk_mib=du_bytes(os.path.join(workdir, "tables")) / MIB,
             disk_used_mib=max(disk_after_import,
                               du_bytes(workdir) + (du_bytes(graph_file) if keep else 0)) / MIB,
             measured=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
  if not keep:
    shutil.rmtree(workdir, ignore_errors=True)
    if os.path.exists(graph_file):
      os.remove(graph_file)
  return out


# ---------------------------------------------------------------------------
# Output.


def read_results(path: str) -> list[dict]:
  """Rows of the results file, the latest per (edges, entities, P, d), by edges."""
  rows = {}
  if os.path.exists(path):
    with open(path) as f:
      for number, line in enumerate(f, 1):
        if line.strip():
          try:
            row = json.loads(line)
          except json.JSONDecodeError as e:
            raise SystemExit(f"{path}:{number}: not JSON ({e})") from None
          rows[(row["edges"], row["entities"], row["partitions"], row["dim"])] = row
  return sorted(rows.values(), key=lambda r: (r["edges"], r["entities"], r["partitions"]))


def format_table(rows: list[dict]) -> str:
  lines = ["| edges | entities | P | d | import s | import edges/s | import peak RSS MiB | "
           "train edges/s | train peak RSS MiB | RSS bound MiB | trained | tables MiB | "
           "disk used MiB |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
  for r in rows:
    trained = ("1 epoch" if r["buckets_trained"] >= r["buckets_total"]
               else f"{r['buckets_trained']}/{r['buckets_total']} buckets")
    lines.append(
        f"| {r['edges']:,} | {r['entities']:,} | {r['partitions']} | {r['dim']} | "
        f"{r['import_s']:,.1f} | {r['import_edges_per_s']:,.0f} | "
        f"{r['import_peak_rss_mib']:,.0f} | {r['train_edges_per_s']:,.0f} | "
        f"{r['train_peak_rss_mib']:,.0f} | {r['rss_bound_mib']:,.0f} | {trained} | "
        f"{r['tables_mib']:,.0f} | {r['disk_used_mib']:,.0f} |")
  return "\n".join(lines)


def plot(rows: list[dict], path: str, ram_bytes: int) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  edges = [r["edges"] for r in rows]
  fig, ax = plt.subplots(figsize=(7, 4.5))
  ax.plot(edges, [r["train_peak_rss_mib"] for r in rows], "o-", label="train peak RSS")
  ax.plot(edges, [r["import_peak_rss_mib"] for r in rows], "s-", label="import peak RSS")
  ax.plot(edges, [r["rss_bound_mib"] for r in rows], "k_--", markersize=18,
          label="bound: 2 V/P (d+1) 4 B + 1.5 GiB")
  ax.plot(edges, [r["tables_mib"] for r in rows], "x:", color="gray",
          label="full tables V (d+1) 4 B")
  ax.axhline(ram_bytes / MIB, color="red", lw=0.8, label=f"RAM {ram_bytes / GIB:.0f} GiB")
  for r in rows:
    ax.annotate(f"V={r['entities']:.0e}\nP={r['partitions']}, d={r['dim']}",
                (r["edges"], r["train_peak_rss_mib"]), textcoords="offset points",
                xytext=(4, -22), fontsize=7)
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("edges")
  ax.set_ylabel("MiB")
  ax.set_title("twhin-jax peak RSS against graph size (tools/bench_scale.py)")
  ax.legend(fontsize=8, loc="upper left")
  ax.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sizes", default=DEFAULT_SIZES,
                      help="comma-separated EDGES:ENTITIES[:P] (default %(default)s; P default: "
                           "at most ~2M rows per partition)")
  parser.add_argument("--dim", type=int, default=128)
  parser.add_argument("--max-dim", type=int, default=256,
                      help="largest d the largest row may get so its tables exceed RAM")
  parser.add_argument("--max-buckets", type=int, default=64,
                      help="buckets trained on the largest row (the others: one epoch)")
  parser.add_argument("--dir", default=None, help="scratch directory (default .bench/scale)")
  parser.add_argument("--results", default=None,
                      help="JSON lines the rows are appended to and read back from "
                           "(default <dir>/bench_scale.jsonl)")
  parser.add_argument("--plot", default=None, help="PNG path (default <dir>/bench_scale.png)")
  parser.add_argument("--keep", action="store_true", help="keep each row's input and run")
  parser.add_argument("--stage", choices=("all", "import", "train"), default="all",
                      help="import: generate and import each row, keeping its run directory (the "
                           "input is deleted unless --keep); train: train rows imported so, and "
                           "record them (default: both)")
  parser.add_argument("--dry-run", action="store_true", help="print the plan and stop")
  parser.add_argument("--replot", action="store_true",
                      help="run nothing: the table and the PNG of the rows in --results")
  parser.add_argument("--json", action="store_true", help="one JSON object per row")
  # internal: one phase in its own process
  parser.add_argument("--phase", help=argparse.SUPPRESS)
  for name in ("row", "graph-file", "workdir"):
    parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.phase:
    phase(args)
    return
  import psutil
  try:
    sizes = parse_sizes(args.sizes)
  except ValueError as e:
    parser.error(str(e))
  scratch = os.path.abspath(args.dir or os.path.join(REPO, ".bench", "scale"))
  os.makedirs(scratch, exist_ok=True)
  results = args.results or os.path.join(scratch, "bench_scale.jsonl")
  free = shutil.disk_usage(scratch).free
  if args.stage == "train":  # plan as the import did: its files are the row's own
    free += du_bytes(scratch)
  ram = psutil.virtual_memory().total
  rows, notes = plan_rows(sizes, args.dim, args.max_dim, free, ram, args.max_buckets)
  log(f"free disk {free / GIB:.1f} GiB in {scratch}, RAM {ram / GIB:.1f} GiB")
  for note in notes:
    log(note)
  for row in rows:
    log(f"plan: {row['edges']:,} edges, {row['entities']:,} entities, P={row['partitions']}, "
        f"d={row['dim']}, tables {tables_bytes(row['entities'], row['dim']) / GIB:.2f} GiB, disk "
        f"~{disk_bytes(row['edges'], row['entities'], row['dim']) / GIB:.1f} GiB, train "
        + ("one epoch" if row["max_buckets"] is None
           else f"{min(row['max_buckets'], row['partitions'] ** 2)} buckets"))
  if args.dry_run:
    return
  for row in rows if not args.replot else ():
    out = bench_row(row, scratch, args.keep, args.stage)
    if out is None:
      continue
    out["notes"] = [n for n in notes if row["max_buckets"] is not None]
    out["ram_mib"] = ram / MIB
    with open(results, "a") as f:
      f.write(json.dumps(out) + "\n")
  if args.stage == "import":
    log("imported; finish with --stage train (same --sizes and --dir)")
    return
  shown = read_results(results)
  plot_path = args.plot or os.path.join(scratch, "bench_scale.png")
  plot(shown, plot_path, ram)
  log(f"plot: {plot_path}; rows: {results}")
  if args.json:
    for row in shown:
      print(json.dumps(row))
  else:
    print("\nPower-law graphs, 4 relations, translation + dot, logistic, 50 batch + 50 uniform "
          "negatives, batch 1000\n")
    print(format_table(shown))
    for note in notes:
      print(f"\n{note}")


if __name__ == "__main__":
  main()
