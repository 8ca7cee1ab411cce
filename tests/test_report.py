"""Tests for twhin_jax/report.py: table and verdict helpers, the single-relation
config, quoting, and the CLI's options. The report itself is not run here."""

import math
import os
import subprocess
import sys

import pytest

from twhin_jax import config as config_lib
from twhin_jax import report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_verdict_beats_baseline():
  assert report.verdict(0.90, 0.85) == "reproduced"
  assert report.verdict(0.85, 0.90) == "not"
  assert report.verdict(0.85, 0.85) == "not"
  # Better, but within the noise: partly.
  assert report.verdict(0.752, 0.750, noise=0.007) == "partly"
  assert report.verdict(0.760, 0.750, noise=0.007) == "reproduced"
  # Lower is better (drift).
  assert report.verdict(0.3, 1.4, higher_is_better=False) == "reproduced"
  assert report.verdict(1.5, 1.4, higher_is_better=False) == "not"
  assert report.verdict(math.nan, 1.0) == "not assessed"
  assert report.verdict(None, 1.0) == "not assessed"


def test_no_worse_and_combine():
  assert report.no_worse(0.896, 0.900, tolerance=0.007) == "reproduced"
  assert report.no_worse(0.880, 0.900, tolerance=0.007) == "not"
  assert report.no_worse(0.31, 0.30, higher_is_better=False, tolerance=0.0) == "not"
  assert report.combine_verdicts(["reproduced", "reproduced"]) == "reproduced"
  assert report.combine_verdicts(["reproduced", "not"]) == "partly"
  assert report.combine_verdicts(["partly", "reproduced"]) == "partly"
  assert report.combine_verdicts(["not", "not", "not assessed"]) == "not"
  assert report.combine_verdicts(["not assessed"]) == "not assessed"
  assert report.combine_verdicts([]) == "not assessed"


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


def test_markdown_quoting_helpers():
  text = ("# Title\n\nintro\n\n## FB15k-237, d=200\n\n| a | b |\n|---|---:|\n| x | 1 |\n\n"
          "text\n\n```bash\n# not a heading\n```\n\n## Other\n\n| c |\n|---|\n| y |\n")
  sections = dict(report.markdown_sections(text))
  assert set(sections) == {"Title", "FB15k-237, d=200", "Other"}
  assert "# not a heading" in sections["FB15k-237, d=200"]
  tables = report.markdown_tables(sections["FB15k-237, d=200"])
  assert tables == ["| a | b |\n|---|---:|\n| x | 1 |"]
  headers, rows = report.parse_table(tables[0])
  assert headers == ["a", "b"] and rows == [["x", "1"]]


def test_who_to_follow_comparisons():
  text = ("| dataset | method | path | Recall@10 | MRR |\n|---|---|---|---:|---:|\n"
          "| lastfm | hetero | exact | **0.210** | 0.1 |\n"
          "| lastfm | follow | exact | 0.180 | 0.1 |\n"
          "| lastfm | cosine | exact | 0.150 | 0.1 |\n"
          "| flickr | hetero | exact | 0.050 | 0.1 |\n"
          "| flickr | follow | exact | 0.060 | 0.1 |\n")
  found = {c["dataset"]: c for c in report.who_to_follow_comparisons(text)}
  # Rows grouped under a dataset whose cell is left empty (as in docs/who_to_follow.md).
  grouped = ("| dataset | method | path | Recall@10 |\n|---|---|---|---:|\n"
             "| Last.fm | (a) hetero | exact | 0.1666 |\n| | (b) follow only | exact | 0.2022 |\n"
             "| | (c) cosine | exact | 0.1424 |\n")
  [entry] = report.who_to_follow_comparisons(grouped)
  assert entry == {"dataset": "lastfm", "path": "exact", "hetero": 0.1666, "follow": 0.2022,
                   "cosine": 0.1424}
  assert found["lastfm"]["hetero"] == pytest.approx(0.21)
  assert found["lastfm"]["follow"] == pytest.approx(0.18)
  assert found["lastfm"]["cosine"] == pytest.approx(0.15)
  assert found["flickr"]["follow"] == pytest.approx(0.06)
  assert report.who_to_follow_comparisons("| a | b |\n|---|---|\n| 1 | 2 |\n") == []


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


def test_report_rejects_unknown_budget_and_section(tmp_path):
  with pytest.raises(ValueError, match="budget"):
    report.Report(str(tmp_path), "huge")
  with pytest.raises(ValueError, match="section"):
    report.Report(str(tmp_path), "small", sections=["nope"])


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
