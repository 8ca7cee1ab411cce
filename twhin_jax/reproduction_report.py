"""The reproduction report: `twhin report --out DIR [--budget small|full]`.

Runs the paper's experiments on the public datasets at a stated budget and
writes DIR/report.md, PNG plots and DIR/results.json. Each claim is stated as
the paper makes it, with the paper's numbers beside ours (``CLAIMS``).
Embedding runs and intermediate files go to DIR/runs (``runs_dir``);
finished runs are resumed or skipped when the command is run again.

  who_to_follow  Table 1: TwHIN-Follow vs sparse follow cosine vs follow-
                 sequence SkipGram, R@10 and MRR over seeds
                 (twhin_jax.who_to_follow)
  ablation       Table 2 style: downstream models without / with user and
                 item embeddings (twhin_jax.downstream)
  low_coverage   the remark after Table 2: a low-coverage relation embedded
                 alone vs co-embedded with follows (twhin_jax.low_coverage)
  networks       Section 4.3: two high-coverage relations in one network vs
                 one relation alone
  compression    Fig. 4a: PQ recall@10 at 4x-64x, downstream metrics on
                 PQ-decoded vectors
  drift          Fig. 4c and Table 5: cold retrain vs warm start vs
                 L2-to-previous (twhin_jax.drift_experiment)

Tables 3 and 4 (search ranking, offensive-content detection) need Twitter's
logs and labelled tweets: they are listed as "untested". Everything the
report runs is package code, and the dataset configs it reads ship with the
package (twhin_jax.shipped_configs): it reads nothing relative to a source
checkout, so it runs the same from an installed wheel.

Verdicts compare our numbers with the direction of the paper's claim by
the rule printed beside each check (``verdict``, ``no_worse``,
``combine_verdicts``): "reproduced", "within noise", "not reproduced",
"mixed" (a section whose checks disagree), "untested" (public data cannot
test the claim) or "not assessed" (the data or the section did not run).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import shutil
import sys
import time
import traceback
from importlib import metadata

import numpy as np

from twhin_jax import config as config_lib
from twhin_jax import drift_experiment
from twhin_jax import low_coverage
from twhin_jax import recipes
from twhin_jax import shipped_configs
from twhin_jax import who_to_follow as wtf

#: Table 1's methods, in the order of its rows and headline.
WHO_TO_FOLLOW_METHODS = ("twhin_follow", "cosine", "skipgram")
SECTIONS = ("who_to_follow", "ablation", "low_coverage", "networks", "compression", "drift")
CIAO = "social/ciao-tang2012"
LASTFM = "social/hetrec2011-lastfm-2k"

# dim/epochs: the ablation, networks and compression runs; drift_epochs: the
# drift experiment; who_to_follow / low_coverage: those experiments' grids.
BUDGETS = {
    "small": {"dim": 64, "epochs": 20, "drift_epochs": 10, "factors": (4, 8, 16, 32, 64),
              "pq_factor": 16, "recall_queries": 1000,
              # No tuning: the settings tools/who_to_follow.py chose on the validation
              # share of seed 0 at its defaults (docs/who_to_follow.md), per dataset.
              "who_to_follow": {"datasets": ("lastfm", "flickr"), "seeds": 3, "grid": {},
                                "chosen": {
                                    "lastfm": {"twhin_follow": {"lr": 0.01, "epochs": 80,
                                                                "dim": recipes.DIM},
                                               "skipgram": {"window": 5, "epochs": 30,
                                                            "dim": recipes.DIM}},
                                    "flickr": {"twhin_follow": {"lr": 0.01, "epochs": 160,
                                                                "dim": recipes.DIM},
                                               "skipgram": {"window": 20, "epochs": 10,
                                                            "dim": recipes.DIM}}}},
              # The two experiments of tools/ at the recipes' dimension, as their
              # docs; the ablation, networks, compression and drift runs at the
              # budget's cheaper d = 64.
              "low_coverage": {"datasets": ("lastfm", "flickr"), "seeds": 3,
                               "max_epochs": 30, "eval_every": 5, "dim": recipes.DIM}},
    # Not a CLI choice: a few-minute end-to-end check of the code paths.
    "smoke": {"dim": 16, "epochs": 2, "drift_epochs": 1, "factors": (4, 16, 64),
              "pq_factor": 16, "recall_queries": 200,
              "who_to_follow": {"datasets": ("lastfm",), "seeds": 1,
                                "grid": {"twhin_lr": (0.025,), "twhin_epochs": (2,),
                                         "twhin_dim": 16, "skipgram_window": (5,),
                                         "skipgram_epochs": (2,), "skipgram_dim": 16}},
              "low_coverage": {"datasets": ("lastfm",), "seeds": 1, "max_epochs": 2,
                               "eval_every": 1, "dim": 16}},
    # The recipes' one dimension (recipes.DIM), as every experiment tool uses.
    "full": {"dim": recipes.DIM, "epochs": 50, "drift_epochs": 30, "factors": (2, 4, 8, 16, 32, 64),
             "pq_factor": 16, "recall_queries": 5000,
             # The validation grid (and early stopping) of tools/who_to_follow.py.
             "who_to_follow": {"datasets": ("lastfm", "flickr"), "seeds": 5, "grid": {}},
             "low_coverage": {"datasets": ("lastfm", "flickr"), "seeds": 5,
                              "max_epochs": 40, "eval_every": 5}},
}


@dataclasses.dataclass(frozen=True)
class Claim:
  """One claim of the paper, in its words, with its numbers."""
  key: str
  where: str
  claim: str
  paper: str  # the paper's numbers (or why it has none)
  section: str | None  # the report section that tests it; None: untested here
  why_untested: str = ""


CLAIMS = (
    Claim("table1", "Table 1 (Sec. 6.1)",
          "TwHIN-Follow user embeddings retrieve who-to-follow candidates better than sparse "
          "follow vectors with cosine and than SkipGram on each user's sequence of follows",
          "R@10 21.70% / 19.78% / 18.55%; MRR 0.0635 / 0.058 / 0.051 "
          "(TwHIN-Follow / cosine / SkipGram)", "who_to_follow"),
    Claim("table2", "Table 2 (Sec. 6.2)",
          "adding TwHIN embeddings to ads models raises offline RCE; user embeddings give most "
          "of the gain; advertiser and target embeddings add a little, not monotonically",
          "RCE baseline -> +U -> +U+A+T: Ads1 21.23 -> 21.32 -> 21.48; Ads2 13.53 -> 13.61 -> "
          "13.59; Ads3 17.11 -> 17.26 -> 17.26", "ablation"),
    Claim("low_coverage", "after Table 2",
          "low-coverage relations embedded alone, without a dense relation, \"yielded much "
          "lower improvements, and sometimes even model degradation\"",
          "no number (the experiment is not shown)", "low_coverage"),
    Claim("networks", "Sec. 4.3",
          "high-coverage relations (follows, engagements) are co-embedded with low-coverage "
          "ones but never with each other, to avoid \"cross-entity type interference\"",
          "a design choice; no number", "networks"),
    Claim("table3", "Table 3 (Sec. 6.3)",
          "search ranking: user (TwHIN-Follow, TwHIN-Engagement) and author embeddings raise "
          "MAP and ROC; author embeddings help only with user embeddings",
          "MAP 55.7 -> 57.0, ROC 57.9 -> 59.6 (+U_f+U_e+A)", None,
          "needs Twitter's search logs; no public dataset has queries, engagements and the "
          "follow/engagement graph of the same users"),
    Claim("table4", "Table 4 (Sec. 6.4)",
          "offensive-content detection: TwHIN author embeddings beside BERTweet raise PR-AUC "
          "on collection 1 and are neutral on collection 2",
          "PR-AUC 0.4692 -> 0.5161 (collection 1), 0.7274 -> 0.7174 (collection 2)", None,
          "needs labelled tweets with their authors' follow/engagement graph"),
    Claim("fig4a", "Fig. 4a/4b (Sec. 7.1)",
          "with product quantization, k-NN recall@10 stays \"reasonable\" at high (20x) "
          "compression; search ROC is essentially unchanged up to 30x",
          "recall@10 \"reasonable\" at 20x (plot only); ROC unchanged to 30x", "compression"),
    Claim("fig4c", "Fig. 4c (Sec. 7.2)",
          "warm start keeps embedding deviation lower than the L2 regulariser except for very "
          "high-degree vertices, which overwhelm the regulariser; maximum deviation about 0.05%",
          "maximum deviation ~0.05% (plot only)", "drift"),
    Claim("table5", "Table 5 (Sec. 7.2)",
          "after an update, who-to-follow quality is the same with warm start or the "
          "regulariser as with the control",
          "R@10 21.71 / 21.75 / 21.74; MRR 0.0635 / 0.0635 / 0.0638 (control / warm start / "
          "regulariser)", "drift"),
    Claim("mixtures", "Secs. 4.4, 5.1",
          "k-means mixtures of a user's engagements embed new entities and diversify retrieval",
          "no number", None, "the paper reports no number to compare with "
          "(tools/diverse_eval.py and tools/inductive_eval.py measure ours)"),
)

#: Table 1's numbers, for the columns beside ours.
PAPER_TABLE1 = {"twhin_follow": (0.2170, 0.0635), "cosine": (0.1978, 0.058),
                "skipgram": (0.1855, 0.051)}
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
  """'reproduced' when ours beats the baseline by more than ``noise``,
  'within noise' when it is better by at most ``noise``, else 'not reproduced'."""
  if ours is None or baseline is None or not (math.isfinite(ours) and math.isfinite(baseline)):
    return "not assessed"
  gain = (ours - baseline) if higher_is_better else (baseline - ours)
  if gain > noise:
    return "reproduced"
  if gain > 0:
    return "within noise"
  return "not reproduced"


def no_worse(ours, reference, *, higher_is_better: bool = True, tolerance: float = 0.0) -> str:
  """'reproduced' when ours loses at most ``tolerance`` against the reference,
  else 'not reproduced'."""
  if ours is None or reference is None or not (math.isfinite(ours) and math.isfinite(reference)):
    return "not assessed"
  loss = (reference - ours) if higher_is_better else (ours - reference)
  return "reproduced" if loss <= tolerance else "not reproduced"


def combine_verdicts(verdicts) -> str:
  """One verdict for a claim: 'reproduced' if every check is, 'not reproduced'
  if none is even within noise, 'within noise' if every check is at least
  that, else 'mixed'; 'not assessed' without assessed checks."""
  verdicts = [v for v in verdicts if v != "not assessed"]
  if not verdicts:
    return "not assessed"
  if all(v == "reproduced" for v in verdicts):
    return "reproduced"
  if all(v == "not reproduced" for v in verdicts):
    return "not reproduced"
  if all(v in ("reproduced", "within noise") for v in verdicts):
    return "within noise"
  return "mixed"


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


def metric_standard_error(result: dict, metric: str) -> float:
  """The noise of a downstream result's ``metric``: Hanley-McNeil for
  ROC-AUC, binomial for accuracy."""
  if metric == "roc_auc":
    return binary_auc_se(result)
  if metric == "accuracy":
    return accuracy_standard_error(result["accuracy"], result["examples"])
  raise ValueError(f"no standard error for metric {metric!r} (roc_auc or accuracy)")


def seeded_check(claim: str, ours: dict, other: dict, metric: str, key: str) -> list:
  """A check of two seeded result rows' mean ``metric`` (keys ``metric`` and
  ``metric_std``): the noise is the larger of their seed standard deviations."""
  noise = max(ours[metric + "_std"], other[metric + "_std"])
  return check_row(claim, ours[metric], other[metric],
                   verdict(ours[metric], other[metric], noise=noise), noise, key)


def check_row(claim: str, ours, baseline, result: str, noise=None, key: str = "") -> list:
  """One row of a checks table; ``key`` names the paper claim (``CLAIMS``)
  it counts toward (kept out of the printed table)."""
  gain = None if ours is None or baseline is None else ours - baseline
  return [claim, ours, baseline, gain, noise, result, key]


CHECK_HEADERS = ["check", "ours", "compared with", "difference", "noise (SE / spread / tol.)",
                 "verdict"]


def checks_table(checks) -> str:
  return markdown_table(CHECK_HEADERS, [c[:6] for c in checks])


def claim_verdicts(checks) -> dict[str, str]:
  """Combined verdict per claim key of a section's checks."""
  keys = dict.fromkeys(c[6] for c in checks)
  return {k: combine_verdicts(c[5] for c in checks if c[6] == k) for k in keys}


def mean_spread(row: dict, key: str, digits: int = 4) -> str:
  """'mean ± std' of a seeded result row (keys ``key`` and ``key_std``)."""
  return f"{row[key]:.{digits}f} ± {row.get(key + '_std', 0.0):.{digits}f}"


def single_relation_config(config, keep):
  """A copy of ``config`` with only the relations named in ``keep`` (a name or a
  list), their input files and the entity types they use. A file whose
  relation_name is a template ('rated_{}') is kept when a kept relation
  matches it (all of its relations should then be kept)."""
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



def claim(key: str) -> Claim:
  return next(c for c in CLAIMS if c.key == key)


def claim_text(key: str) -> str:
  c = claim(key)
  return f"**Paper, {c.where}:** {c.claim}. **Paper's numbers:** {c.paper}."


def verdict_line(checks) -> str:
  verdicts = claim_verdicts(checks)
  return "**Verdict:** " + "; ".join(f"{claim(k).where}: {v}" for k, v in verdicts.items()) + "."


@dataclasses.dataclass(frozen=True)
class NetworkComparison:
  """One task of the networks section (paper Sec. 4.3): its downstream model
  fed by the embeddings of one high-coverage relation alone (``single_run``)
  vs two in one network (``run``); the paper's design predicts that the
  single relation does at least as well."""
  dataset: str  # folder under the data dir
  dataset_label: str
  task: str  # Report.task name; also the results key
  task_label: str
  run: str  # Report.<run>_run: the run of all relations
  single_run: str  # Report.<single_run>_run: the run of the one relation
  feature_set: str  # the embeddings the task reads
  single_label: str  # table row labels
  hetero_label: str
  single_short: str  # check and headline labels
  hetero_short: str
  single_key: str  # results keys (results.json, plot_heterogeneity)
  hetero_key: str
  metric: str  # the compared metric and its name
  metric_label: str
  columns: tuple  # (table header, result key) per metric column
  single_plot_label: str  # bar labels in networks.png
  hetero_plot_label: str


NETWORK_COMPARISONS = (
    NetworkComparison(
        dataset=LASTFM, dataset_label="Last.fm", task="lastfm_friends",
        task_label="Last.fm friends", run="lastfm", single_run="lastfm_friend_only",
        feature_set="U", single_label="U from friend only",
        hetero_label="U from friend + listened + tags", single_short="friend-only U",
        hetero_short="friend + engagement U", single_key="friend_only_U", hetero_key="hetero_U",
        metric="roc_auc", metric_label="ROC-AUC",
        columns=(("ROC-AUC", "roc_auc"), ("PR-AUC", "pr_auc"), ("RCE", "rce")),
        single_plot_label="U: friend only", hetero_plot_label="U: all relations"),
    NetworkComparison(
        dataset=CIAO, dataset_label="Ciao", task="ciao_category", task_label="Ciao category",
        run="ciao", single_run="ciao_ratings_only", feature_set="P",
        single_label="P from ratings only", hetero_label="P from trust + ratings",
        single_short="ratings-only P", hetero_short="trust + ratings P",
        single_key="ratings_only_P", hetero_key="hetero_P", metric="accuracy",
        metric_label="accuracy",
        columns=(("accuracy", "accuracy"), ("macro ROC-AUC", "macro_roc_auc")),
        single_plot_label="P: ratings only", hetero_plot_label="P: trust + ratings"),
)


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
    data_dir = data_dir or os.environ.get("TWHIN_DATA_DIR")
    if not data_dir:
      raise ValueError("no datasets folder: pass --data-dir or set TWHIN_DATA_DIR")
    self.data_dir = os.path.abspath(data_dir)
    os.environ["TWHIN_DATA_DIR"] = self.data_dir
    self.seed, self.progress, self.sections = seed, progress, tuple(sections)
    self.started = time.perf_counter()
    self.runs: dict[str, str] = {}
    self.train_seconds: dict[str, float] = {}
    self.cache: dict[tuple, dict] = {}
    self.results: dict = {}
    self.markdown: dict[str, str] = {}
    self.timings: dict[str, float] = {}
    self.summary: dict[str, dict] = {}  # claim key -> {"ours": text, "verdict": ...}

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

  def ours(self, key: str, text: str) -> None:
    """Our headline numbers for a claim, for the summary table."""
    self.summary.setdefault(key, {})["ours"] = text

  def train(self, name: str, config) -> str:
    from twhin_jax import train as train_lib  # lazy: jax (the cli imports this module)
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
    from twhin_jax import downstream  # lazy: jax (the cli imports this module)
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
    from twhin_jax import downstream  # lazy: jax (the cli imports this module)
    if "ciao" not in self.runs:
      self.train("ciao", downstream.ciao_config_without_category(
          shipped_configs.config_path("ciao"), self.overrides()))
    return self.runs["ciao"]

  def ciao_ratings_only_run(self) -> str:
    from twhin_jax import downstream  # lazy: jax (the cli imports this module)
    if "ciao_ratings_only" not in self.runs:
      config = downstream.ciao_config_without_category(
          shipped_configs.config_path("ciao"), self.overrides())
      keep = [r["name"] for r in config.relations if r["name"].startswith("rated_")]
      self.train("ciao_ratings_only", single_relation_config(config, keep))
    return self.runs["ciao_ratings_only"]

  def lastfm_config(self):
    from twhin_jax import downstream  # lazy: jax (the cli imports this module)
    friends = downstream.write_lastfm_train_friends(
        os.path.join(self.runs_dir, "lastfm_friends_train.dat"), seed=self.seed)
    return downstream.lastfm_config_with_held_out_friends(
        friends, shipped_configs.config_path("lastfm"), self.overrides())

  def lastfm_run(self) -> str:
    if "lastfm" not in self.runs:
      self.train("lastfm", self.lastfm_config())
    return self.runs["lastfm"]

  def lastfm_friend_only_run(self) -> str:
    if "lastfm_friend_only" not in self.runs:
      self.train("lastfm_friend_only", single_relation_config(self.lastfm_config(), "friend"))
    return self.runs["lastfm_friend_only"]

  # -- sections --------------------------------------------------------------

  def present_datasets(self, names, datasets: dict, notes: list):
    """(name, dataset) for each of ``names`` whose ``datasets[name].folder`` is
    under the data dir; a note in ``notes`` for each one that is not."""
    for name in names:
      dataset = datasets[name]
      if self.has(dataset.folder):
        yield name, dataset
      else:
        notes.append(f"{name} skipped: {self.data_dir}/{dataset.folder} not found.")

  def section_who_to_follow(self) -> tuple[dict, list, str]:
    setting = self.budget["who_to_follow"]
    seeds = tuple(self.seed + i for i in range(setting["seeds"]))
    rows, checks, notes, results, headline = [], [], [], {}, []
    for name, dataset in self.present_datasets(setting["datasets"], wtf.DATASETS, notes):
      self.log(f"who-to-follow on {name}, seeds {list(seeds)}")
      result = wtf.run_table1(dataset, seeds=seeds, grid=wtf.Grid(**setting["grid"]),
                              workdir=os.path.join(self.runs_dir, "who_to_follow", name),
                              chosen=setting.get("chosen", {}).get(name), log=self.log)
      results[name] = result
      by_method = {r["method"]: r for r in result["rows"]}
      for method in WHO_TO_FOLLOW_METHODS:
        r = by_method[method]
        rows.append([name if method == "twhin_follow" else "",
                     {"twhin_follow": "TwHIN-Follow", "cosine": "sparse follow cosine",
                      "skipgram": "follow-sequence SkipGram"}[method],
                     mean_spread(r, "recall_at_10"), mean_spread(r, "mrr"),
                     mean_spread(r, "scann_recall_at_10") if "scann_mrr" in r else "exact only",
                     mean_spread(r, "scann_mrr") if "scann_mrr" in r else "",
                     f"{100 * PAPER_TABLE1[method][0]:.2f}%", PAPER_TABLE1[method][1],
                     ", ".join(f"{k} {v}" for k, v in r["settings"].items()) or "-"])
      mine = by_method["twhin_follow"]
      for other in ("cosine", "skipgram"):
        for metric, label in (("recall_at_10", "R@10"), ("mrr", "MRR")):
          checks.append(seeded_check(f"{name}: TwHIN-Follow beats {other} ({label}, exact; "
                                     "noise = the larger seed std)", mine, by_method[other],
                                     metric, "table1"))
      headline.append(f"{name} " + ", ".join(
          f"{label} " + " / ".join(f"{by_method[m][metric]:.3f}" for m in WHO_TO_FOLLOW_METHODS)
          for metric, label in (("recall_at_10", "R@10"), ("mrr", "MRR"))))
    if not rows:
      return {}, [], "\n".join(f"> {n}" for n in notes)
    self.ours("table1", "; ".join(headline) + " (TwHIN-Follow / cosine / SkipGram, "
              f"mean over seeds {list(seeds)})")
    md = [claim_text("table1"), "",
          "`twhin_jax.who_to_follow` (also `tools/who_to_follow.py`): per seed, 10% of each "
          "user's follows are held out for test and 10% for validation (a held-out pair leaves "
          "in both directions). Learning rate and epochs (TwHIN) and window and epochs "
          "(SkipGram) are chosen on the validation share of the first seed (at `--budget "
          "small`: the choices tools/who_to_follow.py made on it, docs/who_to_follow.md); "
          "every seed then trains on train + validation and is scored on test. TwHIN-Follow is the follow "
          "relation plus the dataset's low-coverage relations; these graphs have none (every "
          "relation covers nearly every user), so it is the follows alone, as Section 4.3 "
          "prescribes (no second high-coverage relation). Neither graph has follow "
          "timestamps: SkipGram's sequences are in a seeded random order. R@10 and MRR@100 "
          "are micro-averaged over held-out edges; ScaNN uses the retrieval library's "
          "settings; cosine is exact only (sparse vectors as wide as the user count).", ""]
    md += [f"> {n}" for n in notes]
    md += [markdown_table(["dataset", "method", "R@10 exact", "MRR exact", "R@10 ScaNN",
                           "MRR ScaNN", "paper R@10", "paper MRR", "chosen on validation"],
                          rows), "",
           "Mean ± sample standard deviation over seeds. The paper's numbers are Twitter's "
           "(30M candidate accounts, HNSW); public graphs test the ordering, not the values.",
           "", checks_table(checks), "", verdict_line(checks)]
    return {"datasets": results, "checks": checks}, checks, "\n".join(md)
  def section_ablation(self) -> tuple[dict, list, str]:
    from twhin_jax import downstream  # lazy: jax (the cli imports this module)
    rows, cat_rows, checks, results = [], [], [], {}
    notes = []
    rating_claim = {"none": "baseline (Ads1-3 RCE 21.23 / 13.53 / 17.11)",
                    "U": "better than none; most of the gain (21.32 / 13.61 / 17.26)",
                    "P": "a little more with U (A or T: 21.43-21.46 / 13.54-13.63 / 17.27)",
                    "U+P": "best or close, not monotonic (U+A+T: 21.48 / 13.59 / 17.26)"}
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
      for fs in ("U", "U+P"):
        checks.append(check_row(f"Ciao rating: + {fs} beats none (ROC-AUC)",
                                rating[fs]["roc_auc"], base["roc_auc"],
                                verdict(rating[fs]["roc_auc"], base["roc_auc"], noise=se), se,
                                "table2"))
      gain_u = rating["U"]["roc_auc"] - base["roc_auc"]
      gain_up = rating["U+P"]["roc_auc"] - base["roc_auc"]
      checks.append(check_row("Ciao rating: U gives most of U+P's gain (U - none >= half of "
                              "U+P - none)", gain_u, 0.5 * gain_up,
                              no_worse(gain_u, 0.5 * gain_up) if gain_up > 0 else "not assessed",
                              None, "table2"))
      for fs, r in category.items():
        cat_rows.append(["Ciao category (28 classes)" if fs == "none" else "",
                         "none (count, stars, helpfulness)" if fs == "none" else "+ P",
                         r["accuracy"], r["macro_roc_auc"], r["examples"],
                         "baseline" if fs == "none" else "better than none"])
      se = accuracy_standard_error(category["none"]["accuracy"], category["none"]["examples"])
      checks.append(check_row("Ciao category: + P beats none (accuracy)",
                              category["P"]["accuracy"], category["none"]["accuracy"],
                              verdict(category["P"]["accuracy"], category["none"]["accuracy"],
                                      noise=se), se, "table2"))
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
                              verdict(friends["U"]["roc_auc"], base["roc_auc"], noise=se), se,
                              "table2"))
    else:
      notes.append(f"Last.fm skipped: {self.data_dir}/{LASTFM} not found.")
    if not rows and not cat_rows:
      return {}, [], "\n".join(notes)
    ours = []
    if "ciao_rating" in results:
      r = results["ciao_rating"]
      ours.append("Ciao rating ROC-AUC none / +U / +P / +U+P " + " / ".join(
          f"{r[fs]['roc_auc']:.3f}" for fs in ("none", "U", "P", "U+P")))
    if "lastfm_friends" in results:
      r = results["lastfm_friends"]
      ours.append(f"Last.fm friends ROC-AUC none / +U {r['none']['roc_auc']:.3f} / "
                  f"{r['U']['roc_auc']:.3f}")
    self.ours("table2", "; ".join(ours))
    self.plot_ablation(results, os.path.join(self.out, "ablation.png"))
    md = [claim_text("table2"), "",
          "Public analogue: Ciao rating >= 4 of held-out (user, product) pairs with user (U) "
          "and product (P) embeddings (U plays the paper's U, P its A/T); Ciao product "
          "category; Last.fm held-out friendships with user embeddings.", ""]
    md += [f"> {n}" for n in notes]
    if rows:
      md += [markdown_table(["task", "features", "ROC-AUC", "PR-AUC", "RCE", "ΔAUC vs none",
                             "ΔRCE vs none", "paper (Table 2)"], rows), ""]
    if cat_rows:
      md += [markdown_table(["task", "features", "accuracy", "macro ROC-AUC", "test products",
                             "paper (Table 2)"], cat_rows), ""]
    md += ["![downstream ablation](ablation.png)", "", "Checks (noise: Hanley-McNeil standard "
           "error of the baseline's ROC-AUC, or the binomial SE of its accuracy; 'within noise' "
           "= better but by less than 1 SE):", "",
           checks_table(checks), "", verdict_line(checks)]
    results["checks"] = checks
    return results, checks, "\n".join(md)


  def section_low_coverage(self) -> tuple[dict, list, str]:
    setting = self.budget["low_coverage"]
    seeds = tuple(self.seed + i for i in range(setting["seeds"]))
    settings = low_coverage.Settings(dim=setting.get("dim", self.budget["dim"]),
                                     max_epochs=setting["max_epochs"],
                                     eval_every=setting["eval_every"])
    rows, checks, notes, results, headline = [], [], [], {}, []
    for name, dataset in self.present_datasets(setting["datasets"], low_coverage.DATASETS,
                                               notes):
      self.log(f"low coverage on {name}: {dataset.relation} for {settings.coverage:.0%} of "
               f"users, alone vs with {dataset.follow}; seeds {list(seeds)}")
      result = low_coverage.run(dataset, seeds=seeds, settings=settings,
                                workdir=os.path.join(self.runs_dir, "low_coverage", name),
                                log=self.log)
      results[name] = result
      rows += result["rows"]
      get = {(r["setup"], r["measure"]): r for r in result["rows"]}
      for measure, key, label in (("link", "mrr", "link prediction test MRR"),
                                  ("downstream", "roc_auc", "downstream ROC-AUC")):
        checks.append(seeded_check(f"{name}: co-embedded beats alone ({label}; noise = the "
                                   "larger seed std)", get[("co_embedded", measure)],
                                   get[("alone", measure)], key, "low_coverage"))
      headline.append(f"{name} " + "; ".join(
          f"{label} " + ", ".join(f"{setup.replace('_', '-')} {get[(setup, measure)][key]:.3f}"
                                  for setup in setups)
          for measure, key, label, setups in (
              ("downstream", "roc_auc", "ROC-AUC", ("none", "alone", "co_embedded")),
              ("link", "mrr", "MRR", ("alone", "co_embedded")))))
    if not rows:
      return {}, [], "\n".join(f"> {n}" for n in notes)
    self.ours("low_coverage", "; ".join(headline))
    first = rows[0]
    md = [claim_text("low_coverage"), "",
          "`twhin_jax.low_coverage` (also `tools/low_coverage.py`, docs/low_coverage.md): the "
          "public graphs have no low-coverage relation, so the engagement relation (Last.fm "
          "`listened`, Flickr `interacts`) is kept for a seeded "
          f"{settings.coverage:.0%} of its users and split 80/10/10 for them. *alone* trains "
          "on it only; *co-embedded* adds the whole follow relation (the paper's TwHIN-Follow "
          "recipe). Both are scored for the covered users: the run's filtered test MRR / "
          "Hits@10 of the relation, and a downstream classifier (twhin_jax.downstream's model "
          "and metrics) of held-out engagements against 4 random items each, features none or "
          "+ user and item embeddings. Epochs are chosen per setup on the validation share "
          f"(d = {settings.dim}).", ""]
    md += [f"> {n}" for n in notes]
    md += [markdown_table(["dataset", "embeddings", "link MRR", "link Hits@10",
                           "downstream ROC-AUC", "downstream RCE"],
                          low_coverage.table_rows(rows)), "",
           f"Mean ± standard deviation over seeds {list(seeds)}; {first['covered_users']} of "
           f"{first['users']} users covered on {first['dataset']}. The paper: alone \"yielded "
           "much lower improvements, and sometimes even model degradation\" (no numbers).", "",
           checks_table(checks), "", verdict_line(checks)]
    return {"datasets": results, "checks": checks}, checks, "\n".join(md)

  def section_drift(self) -> tuple[dict, list, str]:
    if not self.has(LASTFM):
      return {}, [], f"> Skipped: {self.data_dir}/{LASTFM} not found."
    out = os.path.join(self.runs_dir, "drift")
    settings = drift_experiment.Settings(dim=self.budget["dim"],
                                         epochs=self.budget["drift_epochs"], seed=self.seed)
    self.log(f"drift experiment: {settings}")
    results = drift_experiment.run(out, settings, progress=self.progress, log=self.log)
    shutil.copy(os.path.join(out, "drift_by_degree.png"),
                os.path.join(self.out, "drift_by_degree.png"))
    paper = {"cold": "control: R@10 21.71, MRR 0.0635",
             "warm_start": "R@10 21.75, MRR 0.0635; deviation below the regulariser's",
             "l2_to_previous": "R@10 21.74, MRR 0.0638"}
    rows = [[name, r["mean_rel_l2"], r["p99_rel_l2"], r["overlap_at_10"], r["test_mrr"],
             r["friend_roc_auc"], r["friend_rce"], paper.get(name, "")]
            for name, r in results.items()]
    cold, warm, l2 = results["cold"], results["warm_start"], results["l2_to_previous"]
    checks = []
    low, high = degree_halves(l2["drift"]["per_degree_bucket"], warm["drift"]["per_degree_bucket"])
    if low and high:
      checks.append(check_row(
          f"Fig. 4c: warm start drifts less than the regulariser for degree 1-"
          f"{low['degree_hi'] - 1} ({low['count']:,} entities; mean rel. L2)",
          low["mean_rel_l2"], low["cold_mean_rel_l2"],
          verdict(low["mean_rel_l2"], low["cold_mean_rel_l2"], higher_is_better=False),
          None, "fig4c"))
      _, top = degree_extremes(l2["drift"]["per_degree_bucket"],
                               warm["drift"]["per_degree_bucket"])
      if top:
        top_l2 = next(b for b in l2["drift"]["per_degree_bucket"] if b["bucket"] == top["bucket"])
        checks.append(check_row(
            f"Fig. 4c: except the highest degrees: there the regulariser drifts no more than "
            f"warm start (degree [{top['degree_lo']}, {top['degree_hi']}), {top['count']:,} "
            "entities)", top_l2["mean_rel_l2"], top["mean_rel_l2"],
            no_worse(top_l2["mean_rel_l2"], top["mean_rel_l2"], higher_is_better=False),
            None, "fig4c"))
    for name, r in (("warm_start", warm), ("l2_to_previous", l2)):
      tol = 0.05 * cold["test_mrr"]
      checks.append(check_row(f"Table 5: {name} test MRR within 5% of the cold retrain",
                              r["test_mrr"], cold["test_mrr"],
                              no_worse(r["test_mrr"], cold["test_mrr"], tolerance=tol), tol,
                              "table5"))
      friends = self.cache.get(("lastfm_friends", "lastfm", "U", "full"))
      se = binary_auc_se(friends) if friends else 0.0
      checks.append(check_row(f"Table 5: {name} friend ROC-AUC within 1 SE of the cold retrain",
                              r["friend_roc_auc"], cold["friend_roc_auc"],
                              no_worse(r["friend_roc_auc"], cold["friend_roc_auc"],
                                       tolerance=se), se or None, "table5"))
    self.ours("fig4c", f"mean rel. L2 warm start {warm['mean_rel_l2']:.3f}, regulariser "
              f"{l2['mean_rel_l2']:.3f}, cold {cold['mean_rel_l2']:.3f} (max-deviation value "
              "not comparable: Twitter-scale graph)")
    self.ours("table5", f"Last.fm test MRR cold {cold['test_mrr']:.4f}, warm start "
              f"{warm['test_mrr']:.4f}, regulariser {l2['test_mrr']:.4f}")
    budget = settings
    md = [claim_text("fig4c"), "", claim_text("table5"), "",
          f"`twhin_jax.drift_experiment` (Last.fm; d = {budget.dim}, {budget.epochs} epochs "
          f"per version): version 1 on 95% of the lines, version 2 with the "
          f"{budget.new_fraction:.0%} back, trained cold (another seed: the control), "
          "warm-started from version 1, or warm-started with L2-to-previous (alpha = "
          f"{budget.alpha}). Drift = ||theta_v2 - theta_v1|| / ||theta_v1|| per shared entity; "
          "overlap@10 of exact cosine neighbours; test MRR of version 2; friend-prediction "
          "ROC-AUC / RCE with version 2's user vectors. The paper's maximum deviation (about "
          "0.05%) is a Twitter-scale value and is not compared.", "",
          markdown_table(["strategy", "mean rel. L2", "p99 rel. L2", "overlap@10", "test MRR",
                          "friend ROC-AUC", "friend RCE", "paper (Table 5 / Fig. 4c)"], rows), "",
          "![drift by degree](drift_by_degree.png)", "",
          "Mean relative L2 change by degree bucket (all types):", "",
          drift_bucket_table(results), "",
          "Checks:", "", checks_table(checks), "", verdict_line(checks)]
    summary = {name: {k: v for k, v in r.items() if k != "drift"} for name, r in results.items()}
    for name, r in results.items():
      summary[name]["per_degree_bucket"] = r["drift"]["per_degree_bucket"]
    return {"strategies": summary, "checks": checks}, checks, "\n".join(md)
  def section_networks(self) -> tuple[dict, list, str]:
    tables, checks, results, notes, ours = [], [], {}, [], []
    for comparison in NETWORK_COMPARISONS:
      if not self.has(comparison.dataset):
        notes.append(f"{comparison.dataset_label} skipped: {self.data_dir}/"
                     f"{comparison.dataset} not found.")
        continue
      for run in (comparison.run, comparison.single_run):
        getattr(self, f"{run}_run")()
      none, single, hetero = (self.task(comparison.task, run, fs) for run, fs in (
          (comparison.run, "none"), (comparison.single_run, comparison.feature_set),
          (comparison.run, comparison.feature_set)))
      results[comparison.task] = {"none": none, comparison.hetero_key: hetero,
                                  comparison.single_key: single}
      headers, keys = zip(*comparison.columns)
      rows = []
      for label, r, claim in (("none (no embeddings)", none, ""),
                              (f"+ {comparison.single_label}", single,
                               "one high-coverage relation"),
                              (f"+ {comparison.hetero_label}", hetero,
                               "two high-coverage relations: interference")):
        rows.append([comparison.task_label if r is none else "", label]
                    + [r[k] for k in keys] + [claim])
      tables.append(markdown_table(["task", "embeddings", *headers, "paper (Sec. 4.3)"], rows))
      metric, metric_name = comparison.metric, comparison.metric_label
      se = metric_standard_error(hetero, metric)
      checks.append(check_row(f"{comparison.task_label}: {comparison.single_short} beats "
                              f"{comparison.hetero_short} ({metric_name})", single[metric],
                              hetero[metric], verdict(single[metric], hetero[metric], noise=se),
                              se, "networks"))
      ours.append(f"{comparison.task_label} {metric_name} {comparison.single_short} "
                  f"{single[metric]:.3f}, {comparison.hetero_short} {hetero[metric]:.3f}")
    if not checks:
      return {}, [], "\n".join(notes)
    self.ours("networks", "; ".join(ours))
    self.plot_heterogeneity(results, os.path.join(self.out, "networks.png"))
    md = [claim_text("networks"), "",
          "The paper gives no measurement of the interference; it designs around it. Here two "
          "high-coverage relations share one network and the embeddings serve a task; the "
          "paper's design predicts that one relation alone does at least as well. (The "
          "who-to-follow section trains TwHIN-Follow on the follows alone for the same "
          "reason.)", "",
          "Same downstream models and examples; only the graph the embeddings were trained on "
          "changes (`single_relation_config` keeps the named relations, their files and the "
          "entity types they use). Last.fm: the friend relation alone (with the same held-out "
          "friendships removed) vs friend + listened + tagged + has_tag + uses_tag. Ciao: the "
          "five rated_k relations alone vs trust + rated_k (the category task does not depend "
          "on the run's edge split; the rating task does, so it is not compared here). Users "
          "whose every friendship is held out have no vector in the friend-only run (a zero "
          "vector is looked up).", ""]
    md += [f"> {n}" for n in notes]
    for table in tables:
      md += [table, ""]
    md += ["![networks](networks.png)", "", checks_table(checks), "", verdict_line(checks)]
    results["checks"] = checks
    return results, checks, "\n".join(md)

  def section_compression(self) -> tuple[dict, list, str]:
    from twhin_jax import compress  # lazy: jax (the cli imports this module)
    if not self.has(CIAO):
      return {}, [], f"> Skipped: {self.data_dir}/{CIAO} not found."
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
    # The paper's 20x: our factor nearest to it (16x at the default budgets).
    near = min(recall, key=lambda r: abs(math.log(r["factor"] / 20)))
    checks = [
        check_row(f"recall@10 \"reasonable\" at high compression: >= 0.5 at "
                  f"{compress._factor_name(near['factor'])}x (nearest the paper's 20x; the "
                  "threshold is ours)", near["recall_at_10"], 0.5,
                  no_worse(near["recall_at_10"], 0.5), None, "fig4a"),
        check_row("recall@10 falls as the factor grows (every step non-increasing)",
                  values[-1], values[0],
                  "reproduced" if all(b <= a + 1e-9 for a, b in zip(values, values[1:]))
                  else "not reproduced", None, "fig4a"),
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
      se = metric_standard_error(full, metric)
      tolerance = pq_tolerance(full[metric], none[metric], se)
      down_rows.append([f"{task} (+{fs})", metric, none[metric], full[metric], quantized[metric],
                        quantized[metric] - full[metric], kept_share(quantized[metric],
                                                                     full[metric], none[metric]),
                        "essentially unchanged to 30x (search ROC, Fig. 4b)"])
      checks.append(check_row(f"{task}: PQ {compress._factor_name(factor)}x loses at most "
                              f"max(1 SE, 10% of the gain over none) ({metric})",
                              quantized[metric], full[metric],
                              no_worse(quantized[metric], full[metric], tolerance=tolerance),
                              tolerance, "fig4a"))
    md = [claim_text("fig4a"), "",
          f"PQ of every type of the Ciao run (d = {self.budget['dim']}; M = 4d / factor one-byte "
          "codes, 256 centroids per subspace; `twhin_jax.compress.compress_run`). recall@10 = "
          "share of the 10 exact cosine neighbours among the original vectors that are also "
          "among the 10 of the decoded vectors.", "",
          markdown_table(["factor", "M", "recall@10 (all)"] + [f"recall@10 {t}" for t in types]
                         + ["paper (Fig. 4a)"],
                         [row + ["\"reasonable\" at 20x" if r is near else ""]
                          for r, row in zip(recall, rows)]), "",
          "![PQ recall](compression_recall.png)", "",
          f"Downstream metric with PQ-decoded embeddings at {compress._factor_name(factor)}x:", "",
          markdown_table(["task", "metric", "no embeddings", "uncompressed", f"PQ {factor}x",
                          "difference", "share of the gain kept", "paper (Fig. 4a / Sec. 5.2)"],
                         down_rows), "",
          "Checks (thresholds chosen here, not the paper's numbers):", "",
          checks_table(checks), "", verdict_line(checks)]
    self.ours("fig4a", "recall@10 " + ", ".join(
        f"{compress._factor_name(r['factor'])}x {r['recall_at_10']:.3f}" for r in recall)
        + f"; downstream at {compress._factor_name(factor)}x: " + ", ".join(
            f"{task} {d['full'][d['metric']]:.3f} -> {d[label][d['metric']]:.3f}"
            for task, d in downstream_results.items()))
    return ({"recall": recall, "downstream": downstream_results, "checks": checks},
            checks, "\n".join(md))

  # -- plots -----------------------------------------------------------------

  @staticmethod
  def _bars(ax, groups, title, ylabel):
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

  def _plot_panels(self, panels, path: str, title: str, panel_width: float) -> None:
    """One bar chart per (title, ylabel, [(label, value, color), ...]) panel, side by side."""
    import matplotlib  # lazy: the report writes plots only after a section has run
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy, as matplotlib above
    fig, axes = plt.subplots(1, len(panels), figsize=(panel_width * len(panels), 3),
                             squeeze=False)
    for ax, (panel_title, ylabel, groups) in zip(axes[0], panels):
      self._bars(ax, groups, panel_title, ylabel)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)

  def plot_ablation(self, results: dict, path: str) -> None:
    # (results key, panel title, metric, its label, the color of the feature sets)
    panels = [(title, label, [(fs, r[metric], "grey" if fs == "none" else color)
                              for fs, r in results[key].items()])
              for key, title, metric, label, color in (
                  ("ciao_rating", "Ciao rating >= 4", "roc_auc", "ROC-AUC", "C0"),
                  ("ciao_category", "Ciao category", "accuracy", "accuracy", "C1"),
                  ("lastfm_friends", "Last.fm friends", "roc_auc", "ROC-AUC", "C2"))
              if key in results]
    self._plot_panels(panels, path, "Downstream ablation (cf. paper Table 2)", 3)

  def plot_heterogeneity(self, results: dict, path: str) -> None:
    panels = []
    for comparison, color in zip(NETWORK_COMPARISONS, ("C2", "C1")):
      if comparison.task in results:
        r, metric = results[comparison.task], comparison.metric
        panels.append((comparison.task_label, comparison.metric_label,
                       [("none", r["none"][metric], "grey"),
                        (comparison.single_plot_label, r[comparison.single_key][metric], "C3"),
                        (comparison.hetero_plot_label, r[comparison.hetero_key][metric], color)]))
    self._plot_panels(panels, path, "One relation vs two high-coverage relations in a network",
                      3.5)

  # -- the whole report ----------------------------------------------------

  TITLES = {"who_to_follow": "Who-to-follow (paper Table 1)",
            "ablation": "Downstream ablation (paper Table 2)",
            "low_coverage": "Low-coverage relations alone vs co-embedded (paper, after Table 2)",
            "networks": "One high-coverage relation per network (paper Sec. 4.3)",
            "compression": "Compression (paper Fig. 4a/4b)",
            "drift": "Drift across versions (paper Fig. 4c, Table 5)"}

  def run(self) -> str:
    os.makedirs(self.out, exist_ok=True)
    os.makedirs(self.runs_dir, exist_ok=True)
    self.log(f"budget {self.budget_name}: {self.budget}; data {self.data_dir}; "
             f"runs {self.runs_dir}")
    for number, name in enumerate(self.sections, 1):
      title = f"{number}. {self.TITLES[name]}"
      self.log(f"section {title}")
      started = time.perf_counter()
      try:
        results, checks, md = getattr(self, f"section_{name}")()
      except Exception as err:  # a failed section is reported, the others still run
        traceback.print_exc()
        results, checks = {"error": repr(err)}, []
        md = f"> This section failed: `{err!r}` (see the log); no numbers."
      self.timings[name] = time.perf_counter() - started
      self.results[name] = results
      for key, value in claim_verdicts(checks).items():
        self.summary.setdefault(key, {})["verdict"] = value
      self.markdown[name] = f"## {title}\n\n{md}\n\n*Section time: {self.timings[name]:.0f} s.*"
      self.log(f"{name}: {claim_verdicts(checks) or 'not assessed'} "
               f"({self.timings[name]:.0f} s)")
      self.write()  # after every section: a partial report survives
    total = time.perf_counter() - self.started
    print(self.summary_table(), file=sys.stderr, flush=True)
    self.log(f"done in {total:.0f} s: {os.path.join(self.out, 'report.md')}")
    return os.path.join(self.out, "report.md")

  def summary_rows(self) -> list[list]:
    """One row per paper claim: where, the claim, the paper's numbers, ours, verdict."""
    rows = []
    for c in CLAIMS:
      entry = self.summary.get(c.key, {})
      if c.section is None:
        ours, outcome = f"untested: {c.why_untested}", "untested"
      elif c.section not in self.sections:
        ours, outcome = "section not run", "not assessed"
      else:
        ours = entry.get("ours", "–")
        outcome = entry.get("verdict", "not assessed")
      rows.append([c.where, c.claim, c.paper, ours, outcome])
    return rows

  def summary_table(self) -> str:
    return markdown_table(["paper", "claim (as the paper makes it)", "paper's numbers", "ours",
                           "verdict"], self.summary_rows(), align=["l"] * 5)

  def meta(self) -> dict:
    import jax  # lazy: the cli imports this module jax-free
    try:
      version = metadata.version("twhin-jax")
    except Exception:  # not installed (a source checkout on PYTHONPATH)
      version = "source checkout"
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "version": version,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                       f"{platform.system()} {platform.release()}, Python "
                       f"{platform.python_version()}, jax {jax.__version__} "
                       f"({jax.default_backend()})",
            "budget": self.budget_name, "budget_settings": self.budget, "seed": self.seed,
            "data_dir": self.data_dir, "runs_dir": self.runs_dir,
            "train_seconds": self.train_seconds, "section_seconds": self.timings,
            "total_seconds": time.perf_counter() - self.started}

  def write(self) -> None:
    meta = self.meta()
    b = self.budget
    header = [
        "# TwHIN reproduction report", "",
        "Generated by `twhin report` (twhin_jax/reproduction_report.py). Paper: El-Kishky et "
        "al., \"TwHIN: Embedding the Twitter Heterogeneous Information Network for "
        "Personalized Recommendation\", KDD 2022. Each claim is stated as the paper makes it, "
        "with the paper's numbers beside ours. The paper's numbers come from Twitter's "
        "internal graph; public graphs test the direction and the mechanism of a claim, not "
        "its values. A claim that public data cannot test is marked untested.", "",
        f"* **Command:** `{self.command}`",
        f"* **Date:** {meta['date']}",
        f"* **Version:** twhin-jax {meta['version']}",
        f"* **Machine:** {meta['machine']}",
        f"* **Budget:** `{self.budget_name}`: ablation / networks / compression runs d = "
        f"{b['dim']}, {b['epochs']} epochs; drift versions {b['drift_epochs']} epochs; PQ "
        f"factors {', '.join(f'{f}x' for f in b['factors'])}; who-to-follow "
        f"seeds: {b['who_to_follow']['seeds']}, low-coverage seeds: {b['low_coverage']['seeds']}; "
        f"base seed {self.seed}",
        f"* **Runtime:** {meta['total_seconds'] / 60:.1f} min in all",
        f"* **Data:** `$TWHIN_DATA_DIR` = `{self.data_dir}`", "",
        "## Summary: the paper's claims", "", self.summary_table(), "",
        "Verdicts: reproduced (our numbers go the paper's way by more than the noise named in "
        "the section), within noise, not reproduced, mixed (the checks of a claim disagree), "
        "untested, not assessed (not run).", ""]
    with open(os.path.join(self.out, "report.md"), "w") as f:
      f.write("\n".join(header) + "\n" + "\n\n".join(self.markdown.values()) + "\n")
    with open(os.path.join(self.out, "results.json"), "w") as f:
      json.dump({"meta": meta, "summary": {c.key: dict(dataclasses.asdict(c),
                                                       **self.summary.get(c.key, {}))
                                           for c in CLAIMS},
                 "sections": _jsonable(self.results)}, f, indent=1)



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
