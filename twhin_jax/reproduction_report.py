"""The reproduction report: `twhin report --out DIR [--budget small|full]`.

Runs the paper's experiments on the public datasets at a stated budget and
writes DIR/report.md, PNG plots and DIR/results.json. Embedding runs and
intermediate files go to DIR/runs (``runs_dir``); finished runs are resumed
or skipped when the command is run again.

  1 downstream ablation (paper Table 2 style)   Ciao rating >= 4 (none/U/P/U+P),
                                                Ciao category (none/P), Last.fm
                                                friends (none/U)
  2 heterogeneity                               the same tasks with embeddings from
                                                one relation only
  3 compression (paper Fig. 4a)                 PQ recall@10 at 4x-64x, downstream
                                                metrics on PQ-decoded vectors at 16x
  4 drift (paper Table 5, Fig. 4c)              tools/drift_experiment.py: cold vs
                                                warm start vs L2-to-previous
  5 link prediction summary                     quoted from docs/results.md,
                                                docs/who_to_follow.md, docs/bench_vs_pbg.md

The paper's exact numbers are not available here: each section states the
paper's claim qualitatively (with its table / figure) beside our numbers,
and a verdict (reproduced / partly / not) computed from our numbers by the
rules printed in the report (``verdict``, ``no_worse``, ``combine_verdicts``).
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("ablation", "heterogeneity", "compression", "drift", "link_prediction")
CIAO = "social/ciao-tang2012"
LASTFM = "social/hetrec2011-lastfm-2k"

# dim/epochs: every embedding run; drift_epochs: tools/drift_experiment.py.
BUDGETS = {
    "small": {"dim": 64, "epochs": 20, "drift_epochs": 10, "factors": (4, 8, 16, 32, 64),
              "pq_factor": 16, "recall_queries": 1000},
    # Not a CLI choice: a few-minute end-to-end check of the code paths.
    "smoke": {"dim": 16, "epochs": 2, "drift_epochs": 1, "factors": (4, 16, 64),
              "pq_factor": 16, "recall_queries": 200},
    "full": {"dim": 128, "epochs": 50, "drift_epochs": 30, "factors": (2, 4, 8, 16, 32, 64),
             "pq_factor": 16, "recall_queries": 5000},
}

PAPER = {
    "table1": "Table 1: heterogeneous TwHIN embeddings beat follow-only embeddings and sparse "
              "(collaborative-filtering) baselines for who-to-follow candidate retrieval",
    "table2": "Table 2: adding TwHIN embeddings to a downstream model improves RCE / ROC-AUC "
              "over the model without them, and using more entity types helps more",
    "hetero": "Tables 1-2: embeddings trained on the heterogeneous graph (several relations) "
              "serve a task better than embeddings from one relation alone",
    "fig4a": "Fig. 4a: product quantization keeps recall high at moderate compression and "
             "degrades at high compression factors",
    "table5": "Table 5 / Fig. 4c: warm start and L2-to-previous reduce embedding drift against "
              "a cold retrain, most for high-degree entities, at small or no quality cost",
}


# --------------------------------------------------------------------------
# Markdown and verdict helpers (tested in tests/test_report.py).


def fmt(value, digits: int = 4) -> str:
  """A number for a table cell; '–' for None / NaN."""
  if value is None:
    return "–"
  if isinstance(value, str):
    return value
  if isinstance(value, float) and not math.isfinite(value):
    return "–"
  if isinstance(value, int) and not isinstance(value, bool):
    return f"{value:,}"
  return f"{value:.{digits}f}"


def markdown_table(headers, rows, align=None) -> str:
  """A GitHub Markdown table; ``align`` per column: 'l' or 'r' (default: r for
  columns whose cells are all numbers, else l). Cells go through ``fmt``."""
  headers = [str(h) for h in headers]
  cells = [[fmt(c) for c in row] for row in rows]
  for row in cells:
    if len(row) != len(headers):
      raise ValueError(f"row {row} has {len(row)} cells, expected {len(headers)}")
  if align is None:
    align = ["r" if rows and all(isinstance(row[i], (int, float)) or row[i] is None
                                 for row in rows) else "l" for i in range(len(headers))]
  escape = lambda s: str(s).replace("|", "\\|").replace("\n", " ")
  lines = ["| " + " | ".join(escape(h) for h in headers) + " |",
           "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
  lines += ["| " + " | ".join(escape(c) for c in row) + " |" for row in cells]
  return "\n".join(lines)


def verdict(ours, baseline, *, higher_is_better: bool = True, noise: float = 0.0) -> str:
  """'reproduced' when ours beats the baseline by more than ``noise``, 'partly'
  when it is better by at most ``noise`` (within noise), else 'not'."""
  if ours is None or baseline is None or not (math.isfinite(ours) and math.isfinite(baseline)):
    return "not assessed"
  gain = (ours - baseline) if higher_is_better else (baseline - ours)
  if gain > noise:
    return "reproduced"
  if gain > 0:
    return "partly"
  return "not"


def no_worse(ours, reference, *, higher_is_better: bool = True, tolerance: float = 0.0) -> str:
  """'reproduced' when ours loses at most ``tolerance`` against the reference, else 'not'."""
  if ours is None or reference is None or not (math.isfinite(ours) and math.isfinite(reference)):
    return "not assessed"
  loss = (reference - ours) if higher_is_better else (ours - reference)
  return "reproduced" if loss <= tolerance else "not"


def combine_verdicts(verdicts) -> str:
  """One verdict for a section: 'reproduced' if every check is, 'not' if none is
  even partly, else 'partly'; 'not assessed' without assessed checks."""
  verdicts = [v for v in verdicts if v != "not assessed"]
  if not verdicts:
    return "not assessed"
  if all(v == "reproduced" for v in verdicts):
    return "reproduced"
  if all(v == "not" for v in verdicts):
    return "not"
  return "partly"


def auc_standard_error(auc: float, positives: int, negatives: int) -> float:
  """Hanley & McNeil (1982) standard error of a ROC-AUC (unpaired, conservative
  for two models on the same test set)."""
  if positives <= 0 or negatives <= 0 or not math.isfinite(auc):
    return math.nan
  q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
  variance = (auc * (1 - auc) + (positives - 1) * (q1 - auc * auc)
              + (negatives - 1) * (q2 - auc * auc)) / (positives * negatives)
  return math.sqrt(max(variance, 0.0))


def accuracy_standard_error(accuracy: float, examples: int) -> float:
  """Binomial standard error of an accuracy over ``examples`` test rows."""
  if examples <= 0 or not math.isfinite(accuracy):
    return math.nan
  return math.sqrt(accuracy * (1 - accuracy) / examples)


def binary_auc_se(result: dict) -> float:
  """Standard error of a downstream binary result's ROC-AUC (from its counts)."""
  n = result.get("examples", 0)
  positives = int(round(result.get("positive_rate", math.nan) * n)) if n else 0
  return auc_standard_error(result.get("roc_auc", math.nan), positives, n - positives)


def check_row(claim: str, ours, baseline, result: str, noise=None) -> list:
  gain = None if ours is None or baseline is None else ours - baseline
  return [claim, ours, baseline, gain, noise, result]


CHECK_HEADERS = ["check", "ours", "compared with", "difference", "noise (1 SE / tol.)", "verdict"]


def single_relation_config(config, keep):
  """A copy of ``config`` with only the relations named in ``keep`` (a name or a
  list), their input files and the entity types they use. A file whose
  relation_name is a template ('rated_{}') is kept when a kept relation
  matches it (all of its relations should then be kept)."""
  import copy
  from twhin_jax import config as config_lib
  keep = [keep] if isinstance(keep, str) else list(keep)
  names = [r["name"] for r in config.relations]
  unknown = [k for k in keep if k not in names]
  if unknown:
    raise ValueError(f"unknown relation(s) {unknown}; the config has {names}")
  config = copy.deepcopy(config)
  config.relations = [r for r in config.relations if r["name"] in keep]
  config.data.files = [f for f in config.data.files
                       if _file_has_relation(f.get("relation_name") or "", keep)]
  if not config.data.files:
    raise ValueError(f"no input file names relation(s) {keep} by relation_name")
  used = {t for r in config.relations for t in (r["source"], r["target"])}
  for name in list(config.entities.keys()):
    if name not in used:
      del config.entities[name]
  config.name = f"{config.name}-only-{'+'.join(keep)}"
  config_lib.validate(config)
  return config


def _file_has_relation(relation_name: str, keep) -> bool:
  """Whether a file spec's relation_name (a name, or a template such as
  'rated_{}' filled from a column) yields one of the relations in ``keep``."""
  if "{}" not in relation_name:
    return relation_name in keep
  pattern = "^" + ".*".join(re.escape(p) for p in relation_name.split("{}")) + "$"
  return any(re.match(pattern, name) for name in keep)


def markdown_sections(text: str) -> list[tuple[str, str]]:
  """(heading, body) of every ``#`` section of a Markdown document."""
  out, heading, body = [], "", []
  in_code = False
  for line in text.splitlines():
    if line.startswith("```"):
      in_code = not in_code
    if not in_code and re.match(r"^#{1,6} ", line):
      out.append((heading, "\n".join(body)))
      heading, body = line.lstrip("#").strip(), []
    else:
      body.append(line)
  out.append((heading, "\n".join(body)))
  return [(h, b) for h, b in out if h or b.strip()]


def markdown_tables(text: str) -> list[str]:
  """Every Markdown table (consecutive lines starting with '|') in ``text``."""
  tables, current = [], []
  for line in text.splitlines() + [""]:
    if line.lstrip().startswith("|"):
      current.append(line.strip())
    else:
      if len(current) >= 2:
        tables.append("\n".join(current))
      current = []
  return tables


def parse_table(table: str) -> tuple[list[str], list[list[str]]]:
  lines = [l for l in table.splitlines() if not re.match(r"^\|[\s:|-]+\|$", l.strip())]
  split = lambda l: [c.strip() for c in l.strip().strip("|").split("|")]
  return split(lines[0]), [split(l) for l in lines[1:]]


def _number(cell: str):
  match = re.search(r"-?\d+(?:\.\d+)?", cell.replace(",", "").replace("*", ""))
  return float(match.group()) if match else None


def who_to_follow_comparisons(text: str, metric: str = "recall@10") -> list[dict]:
  """From the tables of docs/who_to_follow.md: per (dataset, path) the best
  ``metric`` of the hetero, follow-only and cosine methods (best effort: rows
  are recognised by the words hetero / follow / cosine and lastfm / flickr)."""
  found: dict[tuple, dict] = {}
  for table in markdown_tables(text):
    headers, rows = parse_table(table)
    column = next((i for i, h in enumerate(headers)
                   if metric.replace("@", "").lower() in h.lower().replace("@", "").replace(" ", "")),
                  None)
    if column is None:
      continue
    previous: list[str] = []
    for row in rows:
      if column >= len(row):
        continue
      # Empty cells repeat the row above (tables that group rows by dataset).
      row = [cell or (previous[i] if i < len(previous) else "") if i < column else cell
             for i, cell in enumerate(row)]
      previous = row
      joined = " ".join(row[:column]).lower()
      method = ("hetero" if "hetero" in joined else "cosine" if "cosine" in joined
                else "follow" if "follow" in joined else None)
      value = _number(row[column])
      if method is None or value is None:
        continue
      dataset = ("lastfm" if re.search(r"last\.?fm", joined) else
                 "flickr" if "flickr" in joined else "")
      path = "exact" if "exact" in joined else "scann" if "scann" in joined else ""
      entry = found.setdefault((dataset, path), {"dataset": dataset, "path": path})
      entry[method] = max(entry.get(method, -math.inf), value)
  return [e for e in found.values() if "hetero" in e]


# --------------------------------------------------------------------------
# Running the experiments.


class Report:
  """Holds the budget, the run directories and every result of one report."""

  def __init__(self, out: str, budget: str = "small", data_dir: str | None = None,
               runs_dir: str | None = None, seed: int = 0, progress: bool = True,
               sections=SECTIONS):
    if budget not in BUDGETS:
      raise ValueError(f"unknown budget {budget!r}; choose from {sorted(BUDGETS)}")
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
      raise ValueError(f"unknown section(s) {unknown}; choose from {SECTIONS}")
    self.command = " ".join(
        ["twhin report", f"--out {out}", f"--budget {budget}"]
        + ([f"--data-dir {data_dir}"] if data_dir else [])
        + ([f"--runs-dir {runs_dir}"] if runs_dir else [])
        + ([f"--seed {seed}"] if seed else [])
        + ([f"--sections {','.join(sections)}"] if tuple(sections) != SECTIONS else []))
    self.out = os.path.abspath(out)
    self.runs_dir = os.path.abspath(runs_dir or os.path.join(out, "runs"))
    self.budget_name, self.budget = budget, dict(BUDGETS[budget])
    self.data_dir = os.path.abspath(data_dir or os.environ.get("TWHIN_DATA_DIR")
                                    or os.path.join(os.path.dirname(REPO), "shared", "data"))
    os.environ["TWHIN_DATA_DIR"] = self.data_dir
    self.seed, self.progress, self.sections = seed, progress, tuple(sections)
    self.started = time.perf_counter()
    self.runs: dict[str, str] = {}
    self.train_seconds: dict[str, float] = {}
    self.cache: dict[tuple, dict] = {}
    self.results: dict = {}
    self.markdown: dict[str, str] = {}
    self.timings: dict[str, float] = {}

  # -- small utilities ------------------------------------------------------

  def log(self, message: str) -> None:
    elapsed = time.perf_counter() - self.started
    print(f"[report {int(elapsed // 60):02d}:{int(elapsed % 60):02d}] {message}",
          file=sys.stderr, flush=True)

  def has(self, dataset: str) -> bool:
    return os.path.isdir(os.path.join(self.data_dir, dataset))

  def overrides(self) -> list[str]:
    return [f"--config.model.dim={self.budget['dim']}",
            f"--config.train.epochs={self.budget['epochs']}",
            "--config.train.eval_every_epochs=0", "--config.train.checkpoint_every_buckets=0",
            f"--config.train.seed={self.seed}"]

  def train(self, name: str, config) -> str:
    from twhin_jax import train as train_lib
    if name in self.runs:
      return self.runs[name]
    workdir = os.path.join(self.runs_dir, name)
    self.log(f"training {name} (d={config.model.dim}, {config.train.epochs} epochs; "
             f"relations {[r['name'] for r in config.relations]}) -> {workdir}")
    started = time.perf_counter()
    train_lib.train(config, workdir, progress=self.progress).close()
    self.train_seconds[name] = time.perf_counter() - started
    self.log(f"{name}: trained/resumed in {self.train_seconds[name]:.0f} s")
    self.runs[name] = workdir
    return workdir

  def task(self, task: str, run: str, feature_set: str, source=None, label: str = "full") -> dict:
    """One downstream fit, cached by (task, run, feature set, label)."""
    from twhin_jax import downstream
    key = (task, run, feature_set, label)
    if key not in self.cache:
      function = {"ciao_rating": downstream.ciao_rating, "ciao_category": downstream.ciao_category,
                  "lastfm_friends": downstream.lastfm_friends}[task]
      run_dir = self.runs[run]
      result = function(run_dir if source is None else source, feature_set=feature_set,
                        run_dir=run_dir, seed=self.seed)
      result.update(run=run, embeddings=label)
      self.log(f"  {task} [{feature_set}, {run}, {label}]: " + ", ".join(
          f"{k} {result[k]:.4f}" for k in ("roc_auc", "rce", "accuracy", "macro_roc_auc")
          if k in result) + f" ({result['seconds']:.0f} s)")
      self.cache[key] = result
    return self.cache[key]

  # -- embedding runs shared by the sections ---------------------------------

  def ciao_run(self) -> str:
    from twhin_jax import downstream
    if "ciao" not in self.runs:
      self.train("ciao", downstream.ciao_config_without_category(
          os.path.join(REPO, "configs", "ciao.py"), self.overrides()))
    return self.runs["ciao"]

  def ciao_ratings_only_run(self) -> str:
    from twhin_jax import downstream
    if "ciao_ratings_only" not in self.runs:
      config = downstream.ciao_config_without_category(
          os.path.join(REPO, "configs", "ciao.py"), self.overrides())
      keep = [r["name"] for r in config.relations if r["name"].startswith("rated_")]
      self.train("ciao_ratings_only", single_relation_config(config, keep))
    return self.runs["ciao_ratings_only"]

  def lastfm_config(self):
    from twhin_jax import downstream
    friends = downstream.write_lastfm_train_friends(
        os.path.join(self.runs_dir, "lastfm_friends_train.dat"), seed=self.seed)
    return downstream.lastfm_config_with_held_out_friends(
        friends, os.path.join(REPO, "configs", "lastfm.py"), self.overrides())

  def lastfm_run(self) -> str:
    if "lastfm" not in self.runs:
      self.train("lastfm", self.lastfm_config())
    return self.runs["lastfm"]

  def lastfm_friend_only_run(self) -> str:
    if "lastfm_friend_only" not in self.runs:
      self.train("lastfm_friend_only", single_relation_config(self.lastfm_config(), "friend"))
    return self.runs["lastfm_friend_only"]

  # -- sections --------------------------------------------------------------

  def section_ablation(self) -> tuple[dict, str, str]:
    from twhin_jax import downstream
    rows, cat_rows, checks, results = [], [], [], {}
    notes = []
    rating_claim = {"none": "baseline", "U": "better than none", "P": "better than none",
                    "U+P": "best (more entity types help)"}
    if self.has(CIAO):
      self.ciao_run()
      rating = {fs: self.task("ciao_rating", "ciao", fs) for fs in downstream.RATING_FEATURE_SETS}
      category = {fs: self.task("ciao_category", "ciao", fs)
                  for fs in downstream.CATEGORY_FEATURE_SETS}
      results["ciao_rating"], results["ciao_category"] = rating, category
      base = rating["none"]
      for fs, r in rating.items():
        rows.append([f"Ciao rating >= 4 ({r['examples']:,} test pairs)" if fs == "none" else "",
                     "none (counts, mean stars)" if fs == "none" else f"+ {fs}",
                     r["roc_auc"], r["pr_auc"], r["rce"],
                     None if fs == "none" else r["roc_auc"] - base["roc_auc"],
                     None if fs == "none" else r["rce"] - base["rce"], rating_claim[fs]])
      se = binary_auc_se(base)
      for fs in ("U", "P", "U+P"):
        checks.append(check_row(f"Ciao rating: + {fs} beats none (ROC-AUC)",
                                rating[fs]["roc_auc"], base["roc_auc"],
                                verdict(rating[fs]["roc_auc"], base["roc_auc"], noise=se), se))
      best_single = max(("U", "P"), key=lambda fs: rating[fs]["roc_auc"])
      checks.append(check_row(f"Ciao rating: U+P beats the better single type ({best_single})",
                              rating["U+P"]["roc_auc"], rating[best_single]["roc_auc"],
                              verdict(rating["U+P"]["roc_auc"], rating[best_single]["roc_auc"],
                                      noise=se), se))
      for fs, r in category.items():
        cat_rows.append(["Ciao category (28 classes)" if fs == "none" else "",
                         "none (count, stars, helpfulness)" if fs == "none" else "+ P",
                         r["accuracy"], r["macro_roc_auc"], r["examples"],
                         "baseline" if fs == "none" else "better than none"])
      se = accuracy_standard_error(category["none"]["accuracy"], category["none"]["examples"])
      checks.append(check_row("Ciao category: + P beats none (accuracy)",
                              category["P"]["accuracy"], category["none"]["accuracy"],
                              verdict(category["P"]["accuracy"], category["none"]["accuracy"],
                                      noise=se), se))
    else:
      notes.append(f"Ciao skipped: {self.data_dir}/{CIAO} not found.")
    if self.has(LASTFM):
      self.lastfm_run()
      friends = {fs: self.task("lastfm_friends", "lastfm", fs)
                 for fs in downstream.FRIEND_FEATURE_SETS}
      results["lastfm_friends"] = friends
      base = friends["none"]
      for fs, r in friends.items():
        rows.append([f"Last.fm friends ({r['examples']:,} test pairs)" if fs == "none" else "",
                     "none (degrees, common friends)" if fs == "none" else "+ U (both users)",
                     r["roc_auc"], r["pr_auc"], r["rce"],
                     None if fs == "none" else r["roc_auc"] - base["roc_auc"],
                     None if fs == "none" else r["rce"] - base["rce"],
                     "baseline" if fs == "none" else "better than none"])
      se = binary_auc_se(base)
      checks.append(check_row("Last.fm friends: + U beats none (ROC-AUC)",
                              friends["U"]["roc_auc"], base["roc_auc"],
                              verdict(friends["U"]["roc_auc"], base["roc_auc"], noise=se), se))
    else:
      notes.append(f"Last.fm skipped: {self.data_dir}/{LASTFM} not found.")
    if not rows and not cat_rows:
      return {}, "not assessed", "\n".join(notes)
    self.plot_ablation(results, os.path.join(self.out, "ablation.png"))
    section_verdict = combine_verdicts(c[-1] for c in checks)
    md = [f"**Paper:** {PAPER['table2']}.", ""]
    md += [f"> {n}" for n in notes]
    if rows:
      md += [markdown_table(["task", "features", "ROC-AUC", "PR-AUC", "RCE", "ΔAUC vs none",
                             "ΔRCE vs none", "paper (Table 2)"], rows), ""]
    if cat_rows:
      md += [markdown_table(["task", "features", "accuracy", "macro ROC-AUC", "test products",
                             "paper (Table 2)"], cat_rows), ""]
    md += ["![downstream ablation](ablation.png)", "", "Checks (noise: Hanley-McNeil standard "
           "error of the baseline's ROC-AUC, or the binomial SE of its accuracy; 'partly' = "
           "better but by less than 1 SE):", "",
           markdown_table(CHECK_HEADERS, checks), "",
           f"**Verdict: {section_verdict}.**"]
    results["checks"] = checks
    return results, section_verdict, "\n".join(md)

  def section_heterogeneity(self) -> tuple[dict, str, str]:
    rows, checks, results, notes = [], [], {}, []
    if self.has(LASTFM):
      self.lastfm_run()
      self.lastfm_friend_only_run()
      none = self.task("lastfm_friends", "lastfm", "none")
      hetero = self.task("lastfm_friends", "lastfm", "U")
      single = self.task("lastfm_friends", "lastfm_friend_only", "U")
      results["lastfm_friends"] = {"none": none, "hetero_U": hetero, "friend_only_U": single}
      for label, r, claim in (("none (no embeddings)", none, "baseline"),
                              ("+ U from friend only", single, "worse than heterogeneous"),
                              ("+ U from friend + listened + tags", hetero, "best")):
        rows.append(["Last.fm friends" if r is none else "", label, r["roc_auc"], r["pr_auc"],
                     r["rce"], claim])
      se = binary_auc_se(single)
      checks.append(check_row("Last.fm friends: heterogeneous U beats friend-only U (ROC-AUC)",
                              hetero["roc_auc"], single["roc_auc"],
                              verdict(hetero["roc_auc"], single["roc_auc"], noise=se), se))
    else:
      notes.append(f"Last.fm skipped: {self.data_dir}/{LASTFM} not found.")
    cat_rows = []
    if self.has(CIAO):
      self.ciao_run()
      self.ciao_ratings_only_run()
      none = self.task("ciao_category", "ciao", "none")
      hetero = self.task("ciao_category", "ciao", "P")
      single = self.task("ciao_category", "ciao_ratings_only", "P")
      results["ciao_category"] = {"none": none, "hetero_P": hetero, "ratings_only_P": single}
      for label, r, claim in (("none (no embeddings)", none, "baseline"),
                              ("+ P from ratings only", single, "worse than heterogeneous"),
                              ("+ P from trust + ratings", hetero, "best")):
        cat_rows.append(["Ciao category" if r is none else "", label, r["accuracy"],
                         r["macro_roc_auc"], claim])
      se = accuracy_standard_error(single["accuracy"], single["examples"])
      checks.append(check_row("Ciao category: trust+ratings P beats ratings-only P (accuracy)",
                              hetero["accuracy"], single["accuracy"],
                              verdict(hetero["accuracy"], single["accuracy"], noise=se), se))
    else:
      notes.append(f"Ciao skipped: {self.data_dir}/{CIAO} not found.")
    if not checks:
      return {}, "not assessed", "\n".join(notes)
    self.plot_heterogeneity(results, os.path.join(self.out, "heterogeneity.png"))
    section_verdict = combine_verdicts(c[-1] for c in checks)
    md = [f"**Paper:** {PAPER['hetero']}.", "",
          "Same downstream models and examples; only the graph the embeddings were trained on "
          "changes (`single_relation_config` keeps the named relations, their files and the "
          "entity types they use). Last.fm: the friend relation alone (with the same held-out "
          "friendships removed) vs friend + listened + tagged + has_tag + uses_tag. Ciao: the "
          "five rated_k relations alone vs trust + rated_k (the category task does not depend "
          "on the run's edge split; the rating task does, so it is not compared here). Users "
          "whose every friendship is held out have no vector in the friend-only run (a zero "
          "vector is looked up).", ""]
    md += [f"> {n}" for n in notes]
    if rows:
      md += [markdown_table(["task", "embeddings", "ROC-AUC", "PR-AUC", "RCE",
                             "paper (Tables 1-2)"], rows), ""]
    if cat_rows:
      md += [markdown_table(["task", "embeddings", "accuracy", "macro ROC-AUC",
                             "paper (Tables 1-2)"], cat_rows), ""]
    md += ["![heterogeneity](heterogeneity.png)", "", markdown_table(CHECK_HEADERS, checks), "",
           f"**Verdict: {section_verdict}.**"]
    results["checks"] = checks
    return results, section_verdict, "\n".join(md)

  def section_compression(self) -> tuple[dict, str, str]:
    from twhin_jax import compress
    if not self.has(CIAO):
      return {}, "not assessed", f"> Skipped: {self.data_dir}/{CIAO} not found."
    ciao = self.ciao_run()
    factors = list(self.budget["factors"])
    self.log(f"PQ of the Ciao run at {factors}x (recall@10 over "
             f"{self.budget['recall_queries']} queries per type)")
    out_root = os.path.join(self.runs_dir, "compressed")
    recall = compress.compress_run(ciao, factors, k=10, num_queries=self.budget["recall_queries"],
                                   seed=self.seed, out_root=out_root, progress=self.progress)
    compress.plot_recall(recall, os.path.join(self.out, "compression_recall.png"), 10)
    types = sorted(recall[0]["per_type"])
    rows = []
    for r in recall:
      rows.append([f"{compress._factor_name(r['factor'])}x",
                   r["per_type"][types[0]]["num_subspaces"], r["recall_at_10"]]
                  + [r["per_type"][t].get("recall_at_k") for t in types])
    for r in recall:
      self.log(f"  {r['factor']}x: recall@10 {r['recall_at_10']:.4f}")
    values = [r["recall_at_10"] for r in recall]
    low = recall[0]
    checks = [
        check_row(f"recall@10 high at moderate compression ({compress._factor_name(low['factor'])}x"
                  " >= 0.9)", low["recall_at_10"], 0.9,
                  no_worse(low["recall_at_10"], 0.9)),
        check_row("recall@10 falls as the factor grows (every step non-increasing)",
                  values[-1], values[0],
                  "reproduced" if all(b <= a + 1e-9 for a, b in zip(values, values[1:]))
                  else "not"),
        check_row(f"recall@10 degrades at high compression ({compress._factor_name(recall[-1]['factor'])}x"
                  " at least 0.2 below the lowest factor)", values[-1], values[0] - 0.2,
                  "reproduced" if values[-1] <= values[0] - 0.2 else "not"),
    ]
    # Downstream metrics on PQ-decoded vectors (codes decoded inside the model).
    factor = self.budget["pq_factor"]
    pq_dir = os.path.join(out_root, f"factor_{compress._factor_name(factor)}")
    down_rows = []
    if not os.path.isdir(pq_dir):
      pq_dir = None
    pq_ciao = compress.load_compressed(pq_dir) if pq_dir else compress.quantize(
        ciao, factor, seed=self.seed)
    label = f"pq{compress._factor_name(factor)}x"
    pairs = [("ciao_rating", "ciao", "U+P", pq_ciao, "roc_auc"),
             ("ciao_category", "ciao", "P", pq_ciao, "accuracy")]
    if self.has(LASTFM):
      self.lastfm_run()
      pq_lastfm = compress.quantize(self.runs["lastfm"], factor, types=["user"], seed=self.seed)
      pairs.append(("lastfm_friends", "lastfm", "U", pq_lastfm, "roc_auc"))
    downstream_results = {}
    for task, run, fs, source, metric in pairs:
      full = self.task(task, run, fs)
      none = self.task(task, run, "none")
      quantized = self.task(task, run, fs, source=source, label=label)
      downstream_results[task] = {"full": full, label: quantized, "none": none, "metric": metric}
      se = (binary_auc_se(full) if metric == "roc_auc"
            else accuracy_standard_error(full["accuracy"], full["examples"]))
      tolerance = pq_tolerance(full[metric], none[metric], se)
      down_rows.append([f"{task} (+{fs})", metric, none[metric], full[metric], quantized[metric],
                        quantized[metric] - full[metric], kept_share(quantized[metric],
                                                                     full[metric], none[metric]),
                        "small loss at moderate compression"])
      checks.append(check_row(f"{task}: PQ {compress._factor_name(factor)}x loses at most "
                              f"max(1 SE, 10% of the gain over none) ({metric})",
                              quantized[metric], full[metric],
                              no_worse(quantized[metric], full[metric], tolerance=tolerance),
                              tolerance))
    section_verdict = combine_verdicts(c[-1] for c in checks)
    md = [f"**Paper:** {PAPER['fig4a']}.", "",
          f"PQ of every type of the Ciao run (d = {self.budget['dim']}; M = 4d / factor one-byte "
          "codes, 256 centroids per subspace; `twhin_jax.compress.compress_run`). recall@10 = "
          "share of the 10 exact cosine neighbours among the original vectors that are also "
          "among the 10 of the decoded vectors.", "",
          markdown_table(["factor", "M", "recall@10 (all)"] + [f"recall@10 {t}" for t in types]
                         + ["paper (Fig. 4a)"],
                         [row + ["high" if i == 0 else "degrades" if i == len(rows) - 1 else ""]
                          for i, row in enumerate(rows)]), "",
          "![PQ recall](compression_recall.png)", "",
          f"Downstream metric with PQ-decoded embeddings at {compress._factor_name(factor)}x:", "",
          markdown_table(["task", "metric", "no embeddings", "uncompressed", f"PQ {factor}x",
                          "difference", "share of the gain kept", "paper (Fig. 4a / Sec. 5.2)"],
                         down_rows), "",
          "Checks (thresholds chosen here, not the paper's numbers):", "",
          markdown_table(CHECK_HEADERS, checks), "", f"**Verdict: {section_verdict}.**"]
    return ({"recall": recall, "downstream": downstream_results, "checks": checks},
            section_verdict, "\n".join(md))

  def section_drift(self) -> tuple[dict, str, str]:
    if not self.has(LASTFM):
      return {}, "not assessed", f"> Skipped: {self.data_dir}/{LASTFM} not found."
    out = os.path.join(self.runs_dir, "drift")
    spec = importlib.util.spec_from_file_location(
        "twhin_drift_experiment", os.path.join(REPO, "tools", "drift_experiment.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--out", out, "--json", "--dim", str(self.budget["dim"]),
            "--epochs", str(self.budget["drift_epochs"]), "--seed", str(self.seed)]
    self.log(f"drift experiment: tools/drift_experiment.py {' '.join(argv)}")
    with open(os.path.join(self.runs_dir, "drift_stdout.jsonl"), "w") as f, \
        contextlib.redirect_stdout(f):
      code = module.main(argv)
    if code:
      raise RuntimeError(f"tools/drift_experiment.py exited with {code}")
    with open(os.path.join(out, "results.json")) as f:
      results = json.load(f)
    with open(os.path.join(out, "results.md")) as f:
      tool_table = f.read().strip()
    shutil.copy(os.path.join(out, "drift_by_degree.png"),
                os.path.join(self.out, "drift_by_degree.png"))
    claims = {"cold": "baseline: largest drift",
              "warm_start": "less drift than cold, quality kept",
              "l2_to_previous": "least drift, quality kept"}
    rows = [[name, r["mean_rel_l2"], r["p99_rel_l2"], r["overlap_at_10"], r["test_mrr"],
             r["friend_roc_auc"], r["friend_rce"], claims.get(name, "")]
            for name, r in results.items()]
    cold = results["cold"]
    checks = []
    for name in ("warm_start", "l2_to_previous"):
      r = results[name]
      checks.append(check_row(f"{name}: mean rel. L2 below cold", r["mean_rel_l2"],
                              cold["mean_rel_l2"],
                              verdict(r["mean_rel_l2"], cold["mean_rel_l2"],
                                      higher_is_better=False)))
      low, high = degree_halves(cold["drift"]["per_degree_bucket"],
                                r["drift"]["per_degree_bucket"])
      if low and high:
        checks.append(check_row(
            f"{name}: drift cut more for high-degree entities (drift / cold drift, degree >= "
            f"{high['degree_lo']}: {high['count']:,} entities, vs degree 1-{low['degree_hi'] - 1}: "
            f"{low['count']:,})", high["ratio"], low["ratio"],
            verdict(high["ratio"], low["ratio"], higher_is_better=False)))
      tol = 0.05 * cold["test_mrr"]
      checks.append(check_row(f"{name}: test MRR within 5% of cold", r["test_mrr"],
                              cold["test_mrr"], no_worse(r["test_mrr"], cold["test_mrr"],
                                                          tolerance=tol), tol))
      se = 0.0
      friends = self.cache.get(("lastfm_friends", "lastfm", "U", "full"))
      if friends:
        se = binary_auc_se(friends)
      checks.append(check_row(f"{name}: friend ROC-AUC within 1 SE of cold",
                              r["friend_roc_auc"], cold["friend_roc_auc"],
                              no_worse(r["friend_roc_auc"], cold["friend_roc_auc"],
                                       tolerance=se), se or None))
    section_verdict = combine_verdicts(c[-1] for c in checks)
    budget = next(iter(results.values()))["budget"]
    md = [f"**Paper:** {PAPER['table5']}.", "",
          f"`tools/drift_experiment.py` (Last.fm; d = {budget['dim']}, {budget['epochs']} epochs "
          f"per version): version 1 on 95% of the lines, version 2 with the "
          f"{budget['new_fraction']:.0%} back, trained cold (another seed), warm-started from "
          "version 1, or warm-started with L2-to-previous (alpha = "
          f"{results['l2_to_previous']['alpha']}). Drift = ||theta_v2 - theta_v1|| / "
          "||theta_v1|| per shared entity; overlap@10 of exact cosine neighbours; test MRR of "
          "version 2; friend-prediction ROC-AUC / RCE with version 2's user vectors.", "",
          markdown_table(["strategy", "mean rel. L2", "p99 rel. L2", "overlap@10", "test MRR",
                          "friend ROC-AUC", "friend RCE", "paper (Table 5 / Fig. 4c)"], rows), "",
          "![drift by degree](drift_by_degree.png)", "",
          "Mean relative L2 change by degree bucket (all types):", "",
          drift_bucket_table(results), "",
          "The tool's own table (`results.md`):", "", tool_table, "",
          "Checks:", "", markdown_table(CHECK_HEADERS, checks), "",
          f"**Verdict: {section_verdict}.**"]
    summary = {name: {k: v for k, v in r.items() if k != "drift"} for name, r in results.items()}
    for name, r in results.items():
      summary[name]["per_degree_bucket"] = r["drift"]["per_degree_bucket"]
    return {"strategies": summary, "checks": checks}, section_verdict, "\n".join(md)

  def section_link_prediction(self) -> tuple[dict, str, str]:
    docs = os.path.join(REPO, "docs")
    md = [f"**Paper:** {PAPER['table1']}. The paper reports no FB15k-237 / Kinship / Nations / "
          "UMLS numbers; those are quoted as a check of the link-prediction trainer. Nothing "
          "here was rerun: the tables are copied from the files named.", ""]
    quoted = {}
    wanted = [("results.md", ("FB15k-237", "Small knowledge graphs")),
              ("who_to_follow.md", None),
              ("bench_vs_pbg.md", ("FB15k-237",))]
    for name, headings in wanted:
      path = os.path.join(docs, name)
      if not os.path.exists(path):
        md += [f"### docs/{name}", "", f"> docs/{name} is not in this checkout: not quoted.", ""]
        quoted[name] = None
        continue
      with open(path) as f:
        text = f.read()
      quoted[name] = text
      md += [f"### From docs/{name}", ""]
      for heading, body in markdown_sections(text):
        if headings is not None and not any(heading.startswith(h) for h in headings):
          continue
        tables = markdown_tables(body)
        if not tables:
          continue
        md += [f"*docs/{name}, section \"{heading}\":*", ""]
        for table in tables:
          md += [table, ""]
    checks = []
    if quoted.get("who_to_follow.md"):
      for c in who_to_follow_comparisons(quoted["who_to_follow.md"]):
        where = " / ".join(x for x in (c["dataset"], c["path"]) if x) or "table"
        for other in ("follow", "cosine"):
          if other in c:
            checks.append(check_row(f"who-to-follow {where}: hetero beats {other} (recall@10)",
                                    c["hetero"], c[other], verdict(c["hetero"], c[other])))
    section_verdict = combine_verdicts(c[-1] for c in checks)
    if checks:
      md += ["Checks (recall@10 read from docs/who_to_follow.md):", "",
             markdown_table(CHECK_HEADERS, checks), ""]
      md += [f"**Verdict (paper Table 1): {section_verdict}.**"]
    else:
      md += ["**Verdict (paper Table 1): not assessed** - no who-to-follow table "
             "(docs/who_to_follow.md with recall@10 of hetero / follow / cosine rows) was found; "
             "section 2's Last.fm friend prediction (heterogeneous vs friend-only embeddings) is "
             "the closest measurement in this report."]
    return {"quoted_files": {k: v is not None for k, v in quoted.items()}, "checks": checks}, \
        section_verdict, "\n".join(md)

  # -- plots -----------------------------------------------------------------

  @staticmethod
  def _bars(ax, groups, title, ylabel):
    import numpy as np
    labels = [g[0] for g in groups]
    values = [g[1] for g in groups]
    colors = [g[2] for g in groups]
    x = np.arange(len(groups))
    ax.bar(x, values, color=colors)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    low = min(values) if values else 0
    ax.set_ylim(max(0.0, low - 0.1), min(1.0, max(values) + 0.05) if values else 1)
    for xi, v in zip(x, values):
      ax.text(xi, v, f"{v:.3f}", ha="center", va="bottom", fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=8)

  def plot_ablation(self, results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = []
    if "ciao_rating" in results:
      panels.append(("Ciao rating >= 4", "ROC-AUC",
                     [(fs, r["roc_auc"], "grey" if fs == "none" else "C0")
                      for fs, r in results["ciao_rating"].items()]))
      panels.append(("Ciao category", "accuracy",
                     [(fs, r["accuracy"], "grey" if fs == "none" else "C1")
                      for fs, r in results["ciao_category"].items()]))
    if "lastfm_friends" in results:
      panels.append(("Last.fm friends", "ROC-AUC",
                     [(fs, r["roc_auc"], "grey" if fs == "none" else "C2")
                      for fs, r in results["lastfm_friends"].items()]))
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3), squeeze=False)
    for ax, (title, ylabel, groups) in zip(axes[0], panels):
      self._bars(ax, groups, title, ylabel)
    fig.suptitle("Downstream ablation (cf. paper Table 2)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)

  def plot_heterogeneity(self, results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = []
    if "lastfm_friends" in results:
      r = results["lastfm_friends"]
      panels.append(("Last.fm friends", "ROC-AUC",
                     [("none", r["none"]["roc_auc"], "grey"),
                      ("U: friend only", r["friend_only_U"]["roc_auc"], "C3"),
                      ("U: all relations", r["hetero_U"]["roc_auc"], "C2")]))
    if "ciao_category" in results:
      r = results["ciao_category"]
      panels.append(("Ciao category", "accuracy",
                     [("none", r["none"]["accuracy"], "grey"),
                      ("P: ratings only", r["ratings_only_P"]["accuracy"], "C3"),
                      ("P: trust + ratings", r["hetero_P"]["accuracy"], "C1")]))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.5 * len(panels), 3), squeeze=False)
    for ax, (title, ylabel, groups) in zip(axes[0], panels):
      self._bars(ax, groups, title, ylabel)
    fig.suptitle("Heterogeneous vs single-relation embeddings", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)

  # -- the whole report ----------------------------------------------------

  def run(self) -> str:
    os.makedirs(self.out, exist_ok=True)
    os.makedirs(self.runs_dir, exist_ok=True)
    self.log(f"budget {self.budget_name}: {self.budget}; data {self.data_dir}; "
             f"runs {self.runs_dir}")
    titles = {"ablation": "1. Downstream ablation (paper Table 2 style)",
              "heterogeneity": "2. Heterogeneous graph vs one relation",
              "compression": "3. Compression (paper Fig. 4a)",
              "drift": "4. Drift across versions (paper Table 5, Fig. 4c)",
              "link_prediction": "5. Link prediction summary (quoted)"}
    verdicts = {}
    for name in self.sections:
      self.log(f"section {titles[name]}")
      started = time.perf_counter()
      try:
        results, section_verdict, md = getattr(self, f"section_{name}")()
      except Exception as err:  # a failed section is reported, the others still run
        traceback.print_exc()
        results, section_verdict = {"error": repr(err)}, "not assessed"
        md = f"> This section failed: `{err!r}` (see the log); no numbers."
      self.timings[name] = time.perf_counter() - started
      self.results[name] = results
      verdicts[name] = section_verdict
      self.markdown[name] = f"## {titles[name]}\n\n{md}\n\n*Section time: " \
                            f"{self.timings[name]:.0f} s.*"
      self.log(f"{name}: verdict {section_verdict} ({self.timings[name]:.0f} s)")
      self.write(titles, verdicts)  # after every section: a partial report survives
    total = time.perf_counter() - self.started
    self.log(f"done in {total:.0f} s: {os.path.join(self.out, 'report.md')}")
    return os.path.join(self.out, "report.md")

  def meta(self) -> dict:
    import jax
    commit = _git(["rev-parse", "HEAD"]) or "unknown"
    dirty = _git(["status", "--porcelain", "--untracked-files=no"])
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": commit, "commit_dirty": bool(dirty),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                       f"{platform.system()} {platform.release()}, Python "
                       f"{platform.python_version()}, jax {jax.__version__} "
                       f"({jax.default_backend()})",
            "budget": self.budget_name, "budget_settings": self.budget, "seed": self.seed,
            "data_dir": self.data_dir, "runs_dir": self.runs_dir,
            "train_seconds": self.train_seconds, "section_seconds": self.timings,
            "total_seconds": time.perf_counter() - self.started}

  def write(self, titles: dict, verdicts: dict) -> None:
    meta = self.meta()
    b = self.budget
    summary = markdown_table(
        ["section", "paper", "verdict"],
        [[titles[name], {"ablation": "Table 2", "heterogeneity": "Tables 1-2",
                         "compression": "Fig. 4a", "drift": "Table 5, Fig. 4c",
                         "link_prediction": "Table 1"}[name], verdicts[name]]
         for name in verdicts])
    header = [
        "# TwHIN reproduction report", "",
        "Generated by `twhin report` (twhin_jax/report.py). Paper: El-Kishky et al., "
        "\"TwHIN: Embedding the Twitter Heterogeneous Information Network for Personalized "
        "Recommendation\", KDD 2022. The paper's exact numbers are not available to this "
        "tool, so none are printed: each table has a \"paper\" column stating the paper's "
        "claim qualitatively, and each verdict follows from our numbers by the rule printed "
        "next to it. All numbers are from one seed.", "",
        f"* **Command:** `{self.command}`",
        f"* **Date:** {meta['date']}",
        f"* **Commit:** `{meta['commit'][:12]}`" + (" (with uncommitted changes)"
                                                    if meta["commit_dirty"] else ""),
        f"* **Machine:** {meta['machine']}",
        f"* **Budget:** `{self.budget_name}`: embedding runs d = {b['dim']}, {b['epochs']} "
        f"epochs; drift versions {b['drift_epochs']} epochs; PQ factors "
        f"{', '.join(f'{f}x' for f in b['factors'])} (recall over {b['recall_queries']} "
        f"queries per type), downstream PQ at {b['pq_factor']}x; seed {self.seed}",
        f"* **Runtime:** {meta['total_seconds'] / 60:.1f} min in all; training " + ", ".join(
            f"{k} {v:.0f} s" for k, v in self.train_seconds.items()),
        f"* **Data:** `$TWHIN_DATA_DIR` = `{self.data_dir}`", "",
        "## Summary", "", summary, ""]
    with open(os.path.join(self.out, "report.md"), "w") as f:
      f.write("\n".join(header) + "\n" + "\n\n".join(self.markdown[n] for n in verdicts) + "\n")
    with open(os.path.join(self.out, "results.json"), "w") as f:
      json.dump({"meta": meta, "verdicts": verdicts, "sections": _jsonable(self.results)}, f,
                indent=1)


def pq_tolerance(full: float, none: float, se: float) -> float:
  """How much a PQ-decoded model may lose against the uncompressed one and still
  count as a small loss: max(1 SE, 10% of the embeddings' gain over none)."""
  gain = full - none if math.isfinite(full) and math.isfinite(none) else 0.0
  return max(se if math.isfinite(se) else 0.0, 0.1 * max(gain, 0.0))


def kept_share(quantized: float, full: float, none: float):
  """Share of the uncompressed embeddings' gain over none that PQ keeps (None
  when the gain is not positive)."""
  gain = full - none
  return (quantized - none) / gain if gain > 0 else None


def degree_halves(cold_buckets, buckets):
  """Entities with degree >= 1 split at the median entity's bucket into a low
  and a high half; each half's count-weighted mean rel. L2 of the strategy and
  of cold, and ratio = strategy / cold. (None, None) without two halves."""
  cold = {b["bucket"]: b for b in cold_buckets}
  paired = sorted(((b, cold[b["bucket"]]) for b in buckets
                   if b["bucket"] in cold and b["degree_lo"] >= 1 and b["count"] > 0
                   and math.isfinite(b["mean_rel_l2"])
                   and math.isfinite(cold[b["bucket"]]["mean_rel_l2"])),
                  key=lambda pair: pair[0]["bucket"])
  if len(paired) < 2:
    return None, None
  total = sum(b["count"] for b, _ in paired)
  running, cut = 0, len(paired) - 1
  for i, (b, _) in enumerate(paired):
    running += b["count"]
    if running >= total / 2:
      cut = min(i + 1, len(paired) - 1)
      break

  def half(part):
    count = sum(b["count"] for b, _ in part)
    ours = sum(b["count"] * b["mean_rel_l2"] for b, _ in part) / count
    theirs = sum(b["count"] * c["mean_rel_l2"] for b, c in part) / count
    return {"degree_lo": part[0][0]["degree_lo"], "degree_hi": part[-1][0]["degree_hi"],
            "count": count, "mean_rel_l2": ours, "cold_mean_rel_l2": theirs,
            "ratio": ours / theirs if theirs > 0 else math.nan}

  return half(paired[:cut]), half(paired[cut:])


def degree_extremes(cold_buckets, buckets, min_count: int = 10):
  """The lowest- and highest-degree buckets (with >= min_count entities in
  both runs) with ratio = mean rel. L2 of the strategy / that of cold."""
  cold = {b["bucket"]: b for b in cold_buckets if b["count"] >= min_count}
  paired = []
  for b in buckets:
    c = cold.get(b["bucket"])
    if c and b["count"] >= min_count and c["mean_rel_l2"] > 0 and math.isfinite(b["mean_rel_l2"]):
      paired.append(dict(b, ratio=b["mean_rel_l2"] / c["mean_rel_l2"]))
  if len(paired) < 2:
    return None, None
  paired.sort(key=lambda b: b["bucket"])
  return paired[0], paired[-1]


def drift_bucket_table(results: dict) -> str:
  names = list(results)
  buckets: dict[int, dict] = {}
  for name in names:
    for b in results[name]["drift"]["per_degree_bucket"]:
      entry = buckets.setdefault(b["bucket"], {"range": f"[{b['degree_lo']}, {b['degree_hi']})",
                                               "count": b["count"]})
      entry[name] = b["mean_rel_l2"]
  rows = [[e["range"], e["count"]] + [e.get(n) for n in names] for _, e in sorted(buckets.items())]
  return markdown_table(["degree", "entities"] + names, rows)


def _git(args) -> str:
  try:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return ""


def _jsonable(value):
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if hasattr(value, "item") and not isinstance(value, (str, bytes)):
    try:
      return value.item()
    except (ValueError, AttributeError):
      return str(value)
  if isinstance(value, (str, int, float, bool)) or value is None:
    return value
  return str(value)


def run_report(out: str, budget: str = "small", data_dir: str | None = None,
               runs_dir: str | None = None, seed: int = 0, progress: bool = True,
               sections=SECTIONS) -> str:
  """Runs the report; returns the path of report.md."""
  return Report(out, budget, data_dir, runs_dir, seed, progress, sections).run()
