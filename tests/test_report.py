"""Tests for twhin_jax/reproduction_report.py: table and verdict helpers, the
claims as the paper makes them, the single-relation config, the CLI's
options, and the package boundary: the report's code runs from the package
files a wheel holds (configs included) and reads nothing from a checkout."""

import ast
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest

from twhin_jax import config as config_lib
from twhin_jax import reproduction_report as report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_verdict_beats_baseline():
  assert report.verdict(0.90, 0.85) == "reproduced"
  assert report.verdict(0.85, 0.90) == "not reproduced"
  assert report.verdict(0.85, 0.85) == "not reproduced"
  # Better, but within the noise.
  assert report.verdict(0.752, 0.750, noise=0.007) == "within noise"
  assert report.verdict(0.760, 0.750, noise=0.007) == "reproduced"
  # Lower is better (drift).
  assert report.verdict(0.3, 1.4, higher_is_better=False) == "reproduced"
  assert report.verdict(1.5, 1.4, higher_is_better=False) == "not reproduced"
  assert report.verdict(math.nan, 1.0) == "not assessed"
  assert report.verdict(None, 1.0) == "not assessed"


def test_no_worse_and_combine():
  assert report.no_worse(0.896, 0.900, tolerance=0.007) == "reproduced"
  assert report.no_worse(0.880, 0.900, tolerance=0.007) == "not reproduced"
  assert report.no_worse(0.31, 0.30, higher_is_better=False, tolerance=0.0) == "not reproduced"
  assert report.combine_verdicts(["reproduced", "reproduced"]) == "reproduced"
  assert report.combine_verdicts(["reproduced", "not reproduced"]) == "mixed"
  assert report.combine_verdicts(["within noise", "reproduced"]) == "within noise"
  assert report.combine_verdicts(["not reproduced", "not reproduced", "not assessed"]) == \
      "not reproduced"
  assert report.combine_verdicts(["not assessed"]) == "not assessed"
  assert report.combine_verdicts([]) == "not assessed"


def test_checks_count_toward_their_claim():
  checks = [report.check_row("a", 0.3, 0.2, "reproduced", 0.01, "table1"),
            report.check_row("b", 0.1, 0.2, "not reproduced", None, "table1"),
            report.check_row("c", 0.5, 0.4, "reproduced", None, "fig4a")]
  assert report.claim_verdicts(checks) == {"table1": "mixed", "fig4a": "reproduced"}
  table = report.checks_table(checks)
  assert "table1" not in table and len(table.splitlines()) == 2 + 3  # the key is not printed
  assert report.verdict_line(checks).startswith("**Verdict:** Table 1 (Sec. 6.1): mixed")
  assert report.mean_spread({"mrr": 0.0635, "mrr_std": 0.0021}, "mrr") == "0.0635 ± 0.0021"


def test_claims_quote_the_paper_and_untested_is_never_partly(tmp_path):
  keys = {c.key for c in report.CLAIMS}
  assert {"table1", "table2", "table3", "table4", "table5", "fig4a", "fig4c",
          "low_coverage", "networks"} <= keys
  table1 = next(c for c in report.CLAIMS if c.key == "table1")
  for number in ("21.70%", "19.78%", "18.55%", "0.0635", "0.058", "0.051"):
    assert number in table1.paper  # the paper's own numbers, not a paraphrase
  assert "SkipGram" in table1.claim and "cosine" in table1.claim
  assert "much lower improvements" in next(c for c in report.CLAIMS
                                           if c.key == "low_coverage").claim
  for c in report.CLAIMS:
    assert c.section is None or c.section in report.SECTIONS
    assert (c.section is None) == bool(c.why_untested)
  r = report.Report(str(tmp_path / "out"), "smoke", data_dir=str(tmp_path),
                    sections=("who_to_follow", "drift"))
  r.summary["table1"] = {"ours": "lastfm R@10 0.2", "verdict": "reproduced"}
  rows = {row[0]: row for row in r.summary_rows()}
  assert rows["Table 1 (Sec. 6.1)"][3:] == ["lastfm R@10 0.2", "reproduced"]
  assert rows["Table 3 (Sec. 6.3)"][4] == "untested"
  assert rows["Table 4 (Sec. 6.4)"][4] == "untested"
  assert rows["Table 2 (Sec. 6.2)"][3:] == ["section not run", "not assessed"]
  assert rows["Table 5 (Sec. 7.2)"][4] == "not assessed"  # drift selected but not run yet
  assert not any("partly" in str(cell) for row in rows.values() for cell in row)
  os.makedirs(r.out)
  r.write()
  text = open(os.path.join(r.out, "report.md")).read()
  assert "21.70%" in text and "untested" in text and "## Summary: the paper's claims" in text
  summary = json.load(open(os.path.join(r.out, "results.json")))["summary"]
  assert summary["table1"]["verdict"] == "reproduced" and summary["table3"]["section"] is None


def test_report_needs_a_data_dir(tmp_path, monkeypatch):
  monkeypatch.delenv("TWHIN_DATA_DIR", raising=False)
  with pytest.raises(ValueError, match="TWHIN_DATA_DIR"):
    report.Report(str(tmp_path), "small")


def test_standard_errors():
  # Hanley-McNeil: 5,704 pairs at 80.7% positive and AUC 0.75 -> about 0.007.
  se = report.auc_standard_error(0.75, 4603, 1101)
  assert 0.006 < se < 0.009
  assert report.binary_auc_se({"roc_auc": 0.75, "examples": 5704,
                               "positive_rate": 4603 / 5704}) == pytest.approx(se)
  assert math.isnan(report.auc_standard_error(0.75, 0, 10))
  assert report.accuracy_standard_error(0.5, 100) == pytest.approx(0.05)


def test_markdown_table():
  text = report.markdown_table(["task", "AUC", "n"], [["a|b", 0.123456, 1234],
                                                      ["c", None, math.nan]])
  lines = text.splitlines()
  assert lines[0] == "| task | AUC | n |"
  assert lines[1] == "|---|---:|---:|"
  assert lines[2] == "| a\\|b | 0.1235 | 1,234 |"
  assert lines[3] == "| c | – | – |"
  with pytest.raises(ValueError):
    report.markdown_table(["a", "b"], [[1]])


def test_single_relation_config_lastfm():
  config = config_lib.load_config(os.path.join(REPO, "configs", "lastfm.py"))
  only = report.single_relation_config(config, "friend")
  assert [r["name"] for r in only.relations] == ["friend"]
  assert [f["relation_name"] for f in only.data.files] == ["friend"]
  assert only.data.files[0]["path"].endswith("user_friends.dat")
  assert set(only.entities.keys()) == {"user"}
  # The original is untouched.
  assert len(config.relations) == 5 and set(config.entities.keys()) == {"user", "artist", "tag"}
  with pytest.raises(ValueError, match="unknown relation"):
    report.single_relation_config(config, "follows")


def test_file_has_relation_templates():
  assert report._file_has_relation("friend", ["friend"])
  assert not report._file_has_relation("friends", ["friend"])
  assert report._file_has_relation("rated_{}", ["rated_1", "rated_5"])
  assert not report._file_has_relation("rated_{}", ["trust"])


def test_single_relation_config_ciao_ratings():
  config = config_lib.load_config(os.path.join(REPO, "configs", "ciao.py"))
  keep = [f"rated_{k}" for k in range(1, 6)]
  only = report.single_relation_config(config, keep)
  assert [r["name"] for r in only.relations] == keep
  # rated_{} is one file spec with the relation taken from a column: kept;
  # trust and in_category files are dropped.
  assert [f["relation_name"] for f in only.data.files] == ["rated_{}"]
  assert set(only.entities.keys()) == {"user", "product"}


def test_degree_extremes_and_bucket_table():
  cold = [{"bucket": b, "degree_lo": 2 ** (b - 1), "degree_hi": 2 ** b, "count": 50,
           "mean_rel_l2": 1.4} for b in range(1, 5)]
  warm = [dict(b, mean_rel_l2=0.7 - 0.15 * i) for i, b in enumerate(cold)]
  low, high = report.degree_extremes(cold, warm)
  assert low["bucket"] == 1 and high["bucket"] == 4
  assert high["ratio"] < low["ratio"]
  table = report.drift_bucket_table({"cold": {"drift": {"per_degree_bucket": cold}},
                                     "warm": {"drift": {"per_degree_bucket": warm}}})
  assert table.splitlines()[0] == "| degree | entities | cold | warm |"
  assert len(table.splitlines()) == 2 + 4


class _NetworksReport(report.Report):
  """The networks section over canned downstream results: no training."""

  def __init__(self, out, datasets):
    super().__init__(out, "small", data_dir=out, sections=["networks"])
    self.datasets = datasets
    self.trained = []

  def has(self, dataset):
    return dataset in self.datasets

  def lastfm_run(self):
    self.trained.append("lastfm")

  def lastfm_friend_only_run(self):
    self.trained.append("lastfm_friend_only")

  def ciao_run(self):
    self.trained.append("ciao")

  def ciao_ratings_only_run(self):
    self.trained.append("ciao_ratings_only")

  def task(self, task, run, feature_set, source=None, label="full"):
    # The single-relation runs score 0.05 higher than the run of every relation.
    value = 0.6 if feature_set == "none" else 0.7 + (0.05 if run.endswith("only") else 0.0)
    return {"roc_auc": value, "pr_auc": value - 0.1, "rce": 10 * value, "accuracy": value - 0.3,
            "macro_roc_auc": value + 0.1, "examples": 4000, "positive_rate": 0.5}


def test_networks_section_compares_one_relation_with_two_per_dataset(tmp_path):
  both = _NetworksReport(str(tmp_path), [report.LASTFM, report.CIAO])
  results, checks, md = both.section_networks()
  assert both.trained == ["lastfm", "lastfm_friend_only", "ciao", "ciao_ratings_only"]
  assert sorted(results) == ["checks", "ciao_category", "lastfm_friends"]
  assert results["lastfm_friends"]["friend_only_U"]["roc_auc"] == pytest.approx(0.75)
  assert results["ciao_category"]["hetero_P"]["accuracy"] == pytest.approx(0.4)
  assert [c[0] for c in checks] == [
      "Last.fm friends: friend-only U beats friend + engagement U (ROC-AUC)",
      "Ciao category: ratings-only P beats trust + ratings P (accuracy)"]
  assert [c[1] - c[2] for c in checks] == [pytest.approx(0.05)] * 2
  # 0.05 is over 1 SE at 4,000 examples for both metrics.
  assert [c[5] for c in checks] == ["reproduced", "reproduced"]
  assert "| task | embeddings | ROC-AUC | PR-AUC | RCE | paper (Sec. 4.3) |" in md
  assert "| task | embeddings | accuracy | macro ROC-AUC | paper (Sec. 4.3) |" in md
  assert "|  | + P from ratings only | 0.4500 | 0.8500 | one high-coverage relation |" in md
  assert both.summary["networks"]["ours"] == (
      "Last.fm friends ROC-AUC friend-only U 0.750, friend + engagement U 0.700; "
      "Ciao category accuracy ratings-only P 0.450, trust + ratings P 0.400")
  assert os.path.getsize(tmp_path / "networks.png") > 0
  ciao_only = _NetworksReport(str(tmp_path / "ciao"), [report.CIAO])
  os.makedirs(ciao_only.out)
  results, checks, md = ciao_only.section_networks()
  assert sorted(results) == ["checks", "ciao_category"] and len(checks) == 1
  assert f"> Last.fm skipped: {ciao_only.data_dir}/{report.LASTFM} not found." in md
  assert _NetworksReport(str(tmp_path / "none"), []).section_networks()[:2] == ({}, [])


def test_report_rejects_unknown_budget_and_section(tmp_path):
  with pytest.raises(ValueError, match="budget"):
    report.Report(str(tmp_path), "huge", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="section"):
    report.Report(str(tmp_path), "small", data_dir=str(tmp_path), sections=["nope"])


def test_cli_report_help_lists_options():
  out = subprocess.run([sys.executable, "-m", "twhin_jax.cli", "report", "--help"],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
  assert out.returncode == 0, out.stderr
  for option in ("--out", "--budget", "--data-dir", "--runs-dir", "--sections", "small", "full"):
    assert option in out.stdout


def test_degree_halves():
  cold = [{"bucket": b, "degree_lo": 0 if b == 0 else 2 ** (b - 1), "degree_hi": 2 ** b,
           "count": 100, "mean_rel_l2": 1.4} for b in range(0, 5)]
  # High-degree entities move less with a warm start.
  warm = [dict(b, mean_rel_l2=0.8 - 0.1 * b["bucket"]) for b in cold]
  low, high = report.degree_halves(cold, warm)
  assert low["degree_lo"] == 1 and high["degree_hi"] == 16  # degree-0 bucket left out
  assert low["count"] + high["count"] == 400
  assert low["ratio"] == pytest.approx((0.7 + 0.6) / 2 / 1.4)
  assert high["ratio"] == pytest.approx((0.5 + 0.4) / 2 / 1.4)
  assert report.verdict(high["ratio"], low["ratio"], higher_is_better=False) == "reproduced"
  assert report.degree_halves(cold[:2], warm[:2]) == (None, None)


def test_pq_tolerance_and_kept_share():
  # Category: gain 0.23 over none -> 10% of it (0.023) beats 1 SE.
  assert report.pq_tolerance(0.389, 0.159, 0.0034) == pytest.approx(0.023)
  # Rating: no gain -> 1 SE.
  assert report.pq_tolerance(0.750, 0.747, 0.007) == pytest.approx(0.007)
  assert report.kept_share(0.374, 0.389, 0.159) == pytest.approx(0.215 / 0.23)
  assert report.kept_share(0.7, 0.7, 0.75) is None


# --------------------------------------------------------------------------
# The package boundary: `twhin report` from an installed package.

#: The modules `twhin report` runs (besides the library it trains with).
REPORT_MODULES = ("reproduction_report", "who_to_follow", "low_coverage", "drift_experiment",
                  "shipped_configs")


def test_report_modules_reach_nothing_outside_the_package():
  """No module the report runs loads code by file path, runs git, or builds
  a path from the repository root (dirname of dirname of __file__)."""
  for name in REPORT_MODULES:
    path = os.path.join(REPO, "twhin_jax", f"{name}.py")
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
        assert not {"subprocess", "importlib.util"} & set(modules), (name, modules)
      if isinstance(node, ast.Attribute):
        assert node.attr not in ("spec_from_file_location", "check_output"), (name, node.attr)
      if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "dirname" \
          and node.args and isinstance(node.args[0], ast.Call) \
          and getattr(node.args[0].func, "attr", "") == "dirname":
        raise AssertionError(f"{name}.py:{node.lineno}: a path from the repository root")
      if isinstance(node, ast.Constant) and isinstance(node.value, str):
        assert not node.value.startswith(("tools/", "docs/", "configs/")), (name, node.value)


def _package_files(tmp_path) -> str:
  """The files a wheel of this checkout holds, laid out by setuptools'
  build_py (the step bdist_wheel runs for a pure-Python package)."""
  build_lib = str(tmp_path / "site")
  out = subprocess.run([sys.executable, "-c", "import setuptools; setuptools.setup()", "-q",
                        "build_py", "--build-lib", build_lib],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  return build_lib


def test_report_runs_from_the_package_files_alone(tmp_path):
  site = _package_files(tmp_path)
  for name in ("lastfm", "flickr", "ciao"):  # the configs ship as package data
    assert os.path.isfile(os.path.join(site, "twhin_jax", "configs", f"{name}.py"))
  for name in REPORT_MODULES:
    assert os.path.isfile(os.path.join(site, "twhin_jax", f"{name}.py"))
  script = textwrap.dedent(f"""
      import os, sys
      allowed = [{site!r}, {str(tmp_path)!r}, sys.prefix, sys.base_prefix, sys.exec_prefix,
                 "/dev", "/proc", "/sys", "/etc", "/usr", "/tmp"]
      repo = {REPO!r}
      bad = []
      def hook(event, args):
        if event == "open" and isinstance(args[0], str):
          path = os.path.realpath(args[0])
          inside = [a for a in allowed if path.startswith(os.path.realpath(a) + os.sep)]
          # The interpreter's own files are fine even where the venv sits in the checkout (CI).
          installed = any(path.startswith(os.path.realpath(p) + os.sep)
                          for p in (sys.prefix, sys.base_prefix, sys.exec_prefix))
          if (path.startswith(repo + os.sep) and not installed) or not inside:
            bad.append(path)
        if event == "subprocess.Popen":
          bad.append("subprocess " + repr(args[1]))
      sys.addaudithook(hook)
      from twhin_jax import reproduction_report, shipped_configs
      from twhin_jax import who_to_follow, low_coverage, drift_experiment
      for name in ("lastfm", "flickr", "ciao"):
        shipped_configs.load(name)
      r = reproduction_report.Report(os.path.join({str(tmp_path)!r}, "out"), "smoke",
                                     data_dir={str(tmp_path)!r})
      os.makedirs(r.out)
      r.write()
      import twhin_jax
      outside = sorted(m.__name__ for m in list(sys.modules.values())
                       if m.__name__.startswith("twhin_jax") and getattr(m, "__file__", None)
                       and not os.path.realpath(m.__file__).startswith({site!r}))
      assert not outside, outside
      assert not bad, bad
      print("ok", len([m for m in sys.modules if m.startswith("twhin_jax")]))
      """)
  env = dict(os.environ, PYTHONPATH=site, TWHIN_DATA_DIR=str(tmp_path))
  out = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and out.stdout.startswith("ok"), out.stdout + out.stderr
  assert os.path.exists(tmp_path / "out" / "report.md")
