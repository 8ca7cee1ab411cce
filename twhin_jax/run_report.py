"""Plots and the short Markdown report written into a run directory."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402

PLOTS_DIR = "plots"


def plot_training(history: list[dict], workdir: str) -> str | None:
  """Training loss and validation MRR per epoch -> <workdir>/plots/training.png."""
  if not history:
    return None
  os.makedirs(os.path.join(workdir, PLOTS_DIR), exist_ok=True)
  epochs = [h["epoch"] + 1 for h in history]
  fig, (ax_loss, ax_mrr) = plt.subplots(1, 2, figsize=(10, 4))
  ax_loss.plot(epochs, [h["loss"] for h in history], marker="o")
  ax_loss.set_xlabel("epoch")
  ax_loss.set_ylabel("training loss per edge")
  ax_loss.set_title("Loss")
  ax_loss.grid(alpha=0.3)
  with_valid = [h for h in history if "valid" in h]
  if with_valid:
    ax_mrr.plot([h["epoch"] + 1 for h in with_valid], [h["valid"]["mrr"] for h in with_valid],
                marker="o", label="MRR")
    ax_mrr.plot([h["epoch"] + 1 for h in with_valid], [h["valid"]["hits@10"] for h in with_valid],
                marker="s", label="Hits@10")
    ax_mrr.legend()
  ax_mrr.set_xlabel("epoch")
  ax_mrr.set_title("Validation (filtered)")
  ax_mrr.grid(alpha=0.3)
  fig.tight_layout()
  path = os.path.join(workdir, PLOTS_DIR, "training.png")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def metrics_table(metrics: dict, keys=("mrr", "mr", "hits@1", "hits@3", "hits@10", "auc")) -> str:
  """A Markdown table of overall and per-relation metrics."""
  lines = ["| relation | count | " + " | ".join(keys) + " |",
           "|---|---:|" + "---:|" * len(keys)]

  def row(name, m):
    return f"| {name} | {m.get('count', '')} | " + " | ".join(
        f"{m[k]:.4f}" if k != "mr" else f"{m[k]:.1f}" for k in keys) + " |"

  lines.append(row("**all**", metrics))
  for name, m in sorted(metrics.get("per_relation", {}).items()):
    lines.append(row(name, m))
  return "\n".join(lines)


def write_report(workdir: str, title: str, sections: list[tuple[str, str]]) -> str:
  """Writes <workdir>/report.md from (heading, Markdown body) sections."""
  path = os.path.join(workdir, "report.md")
  with open(path, "w") as f:
    f.write(f"# {title}\n\n")
    for heading, body in sections:
      f.write(f"## {heading}\n\n{body}\n\n")
  return path
