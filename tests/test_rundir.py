"""rundir: names, checkpoints, read-only opening; readers never rewrite a run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import train_tiny_demo
from twhin_jax import cli
from twhin_jax import rundir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _jax_modules_after_import(module: str) -> list[str]:
  code = (f"import json, sys, {module}\n"
          "print(json.dumps([m for m in sys.modules\n"
          "                  if m.split('.')[0] in ('jax', 'jaxlib', 'orbax', 'flax')]))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
  return json.loads(out.stdout)


@pytest.mark.parametrize("module", ["twhin_jax.rundir", "twhin_jax.embedding_set",
                                    "twhin_jax.config", "twhin_jax.cli",
                                    "twhin_jax.inspection"])
def test_reading_a_run_does_not_import_jax(module):
  assert _jax_modules_after_import(module) == []


def _snapshot(workdir: str) -> dict[str, tuple[str, int]]:
  """(sha256, mtime_ns) of every file of a run, outside what readers may add."""
  out = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(root, name)
      relative = os.path.relpath(path, workdir)
      if relative.startswith((rundir.EXPORT_DIR, rundir.INDEX_DIR, "eval_", rundir.PLOTS_DIR)):
        continue
      with open(path, "rb") as f:
        out[relative] = (hashlib.sha256(f.read()).hexdigest(), os.stat(path).st_mtime_ns)
  return out


def test_eval_and_export_leave_the_run_untouched(demo_run_d16, tmp_path, capsys):
  config_path = os.path.join(demo_run_d16, rundir.CONFIG_FILE)
  with open(config_path, "rb") as f:
    config_bytes = f.read()
  config_mtime = os.stat(config_path).st_mtime_ns
  before = _snapshot(demo_run_d16)
  assert cli.main(["eval", "--workdir", demo_run_d16, "--split", "valid", "--json"]) == 0
  assert cli.main(["export", "--workdir", demo_run_d16, "--out", str(tmp_path / "x"),
                   "--quiet"]) == 0
  capsys.readouterr()
  with open(config_path, "rb") as f:
    assert f.read() == config_bytes
  assert os.stat(config_path).st_mtime_ns == config_mtime
  assert _snapshot(demo_run_d16) == before  # tables, checkpoints, graph: not a byte or a touch
  assert os.path.exists(rundir.eval_file(demo_run_d16, "valid"))


def test_open_run_reads_what_training_left(tmp_path):
  trainer = train_tiny_demo(str(tmp_path / "run"), dim=8, epochs=1, keep_trainer=True)
  try:
    run = rundir.open_run(trainer.workdir)
    assert run.step == rundir.checkpoint_steps(trainer.workdir)[-1]
    assert run.version_id == trainer.lineage["version_id"]
    for entity_type, table in trainer.embeddings().items():
      np.testing.assert_array_equal(run.embeddings(entity_type), table)
      first, rows = next(run.stream(entity_type, block_rows=5))
      assert first == 0
      np.testing.assert_array_equal(rows, table[:5])
    params = run.relation_params()
    assert set(params) == set(trainer.rel_state["params"])
    for group, value in trainer.rel_state["params"].items():
      np.testing.assert_array_equal(params[group], np.asarray(value))
  finally:
    trainer.close()
  # Without config.json the checkpoint's own copy is read.
  os.remove(os.path.join(trainer.workdir, rundir.CONFIG_FILE))
  assert rundir.load_config(trainer.workdir).model.dim == 8


def test_missing_and_partial_runs_are_named(tmp_path, demo_run_d16):
  with pytest.raises(FileNotFoundError, match="no such run directory"):
    rundir.open_run(str(tmp_path / "nowhere"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
    rundir.open_run(str(tmp_path / "empty"))
  with pytest.raises(FileNotFoundError, match="no run here"):
    rundir.load_config(str(tmp_path / "empty"))
  copy = str(tmp_path / "copy")
  shutil.copytree(demo_run_d16, copy)
  steps = rundir.checkpoint_steps(copy)
  # An Orbax write in progress (a tmp name) and a step without meta are not checkpoints.
  os.makedirs(os.path.join(rundir.checkpoint_root(copy), f"{steps[-1] + 1}.orbax-checkpoint-tmp"))
  os.makedirs(os.path.join(rundir.checkpoint_root(copy), str(steps[-1] + 2), "state"))
  assert rundir.checkpoint_steps(copy) == steps
  with pytest.raises(FileNotFoundError, match="no checkpoint at step 7"):
    rundir.open_run(copy, step=7)
  with open(os.path.join(copy, rundir.CONFIG_FILE), "w") as f:
    f.write("{not json")
  with pytest.raises(ValueError, match="config.json: not valid JSON"):
    rundir.open_run(copy)


def test_read_meta_checks_the_format(tmp_path, demo_run_d16):
  ckpt = rundir.checkpoint_dir(demo_run_d16)
  meta = rundir.read_meta(ckpt)
  assert meta["format_version"] == rundir.CHECKPOINT_FORMAT_VERSION
  bad = tmp_path / "ckpt" / "meta"
  bad.mkdir(parents=True)
  (bad / "metadata").write_text(json.dumps({**meta, "format_version": 99}))
  with pytest.raises(ValueError, match="checkpoint format 99"):
    rundir.read_meta(str(tmp_path / "ckpt"))
