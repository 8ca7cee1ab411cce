"""Progress bars only on a terminal: a piped stderr (logs, CI) gets none."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_no_progress_bars_when_stderr_is_not_a_terminal(tmp_path):
  env = {**os.environ, "PYTHONPATH": REPO}
  done = subprocess.run(
      [sys.executable, "-m", "twhin_jax.cli", "import", "--config",
       os.path.join(REPO, "twhin_jax", "demo_config.py") + ":test", "--workdir",
       str(tmp_path / "run")],
      capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
  assert done.returncode == 0, done.stderr
  assert os.path.exists(tmp_path / "run" / "graph" / "manifest.json")
  # tqdm draws bars with "|" and "it/s" or unit rates; none may reach a pipe.
  assert "%|" not in done.stderr and "\r" not in done.stderr, done.stderr[-2000:]
