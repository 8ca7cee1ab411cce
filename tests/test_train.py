"""End-to-end training: the demo's tiny variant, resume after SIGKILL, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from twhin_jax import checkpoint as checkpoint_lib
from twhin_jax import cli
from twhin_jax import config as config_lib
from twhin_jax import rundir
from twhin_jax import demo_config
from twhin_jax import train as train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def committed_tables(workdir: str) -> dict[str, np.ndarray]:
  """The entity tables named by the latest checkpoint, read without a model."""
  return rundir.open_run(workdir).all_embeddings()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("demo"))
  config = demo_config.get_config("test")
  trainer = train_lib.train(config, workdir, progress=False)
  yield trainer, workdir
  trainer.close()


def test_demo_learns_planted_structure(demo_run):
  trainer, workdir = demo_run
  metrics = trainer.evaluate("test", progress=False)
  for key in ("mrr", "mr", "hits@1", "hits@3", "hits@10", "auc"):
    assert key in metrics
  # Random ranking over ~600 users / ~2000 tweets gives MRR well under 0.02.
  assert metrics["mrr"] > 0.05, metrics
  assert metrics["auc"] > 0.8, metrics
  assert len(trainer.history) == trainer.config.train.epochs
  losses = [h["loss"] for h in trainer.history]
  assert losses[-1] < losses[0]
  assert os.path.exists(os.path.join(workdir, "plots", "training.png"))
  with open(os.path.join(workdir, train_lib.METRICS_FILE)) as f:
    records = [json.loads(line) for line in f]
  assert sum(1 for r in records if r.get("event") == "epoch") == trainer.config.train.epochs


def test_checkpoint_describes_itself(demo_run):
  trainer, workdir = demo_run
  meta = checkpoint_lib.Checkpointer(workdir).restore_meta()
  assert meta["format_version"] == checkpoint_lib.FORMAT_VERSION
  assert meta["cursor"] == {"epoch": trainer.config.train.epochs, "bucket": 0}
  assert meta["lineage"]["graph_manifest_hash"] == trainer.graph.manifest_hash
  assert meta["lineage"]["parent_id"] is None
  assert meta["config"]["train"]["seed"] == trainer.config.train.seed
  assert set(meta["slots"]) == {f"{t}/{p}" for t, p in trainer.tables.blocks()}


def test_resumed_run_continues_where_it_stopped(demo_run, tmp_path):
  """A finished run, reopened with more epochs, trains only the new epochs."""
  trainer, workdir = demo_run
  config = demo_config.get_config("test")
  config.train.epochs = trainer.config.train.epochs
  again = train_lib.Trainer(config, workdir, progress=False)
  assert again.cursor == {"epoch": config.train.epochs, "bucket": 0}
  history = again.run()
  assert len(history) == config.train.epochs  # nothing re-trained
  again.close()


def test_changed_config_is_refused(demo_run):
  _, workdir = demo_run
  config = demo_config.get_config("test")
  config.model.dim = 32
  with pytest.raises(ValueError, match="model.dim"):
    train_lib.Trainer(config, workdir, progress=False)


def _train_command(workdir: str, epochs: int, batch_preparation: str = "auto",
                   background_checkpoints: str = "auto") -> list[str]:
  return [sys.executable, "-m", "twhin_jax.cli", "train", "--config",
          os.path.join(REPO, "configs", "demo.py:test"), "--workdir", workdir, "--quiet",
          f"--config.train.epochs={epochs}", "--config.train.eval_every_epochs=0",
          "--config.train.checkpoint_every_buckets=1",
          f"--config.train.batch_preparation={batch_preparation}",
          f"--config.train.background_checkpoints={background_checkpoints}"]


def _bucket_lines(workdir: str) -> int:
  path = os.path.join(workdir, train_lib.METRICS_FILE)
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return sum(1 for line in f if '"bucket_index"' in line)


# "auto" is the host path on CPU; "device" forms the batches inside jit
# (device_batching.py), keyed by (seed, epoch, bucket, slice). Background
# checkpoints ("auto" is off on CPU) write the tables while the next
# buckets train; the reference run writes its checkpoints in the foreground,
# so the tables must not depend on when they were written either.
@pytest.mark.parametrize("batch_preparation,background_checkpoints",
                         [("auto", "auto"), ("device", "auto"), ("auto", "on")])
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path, batch_preparation,
                                                                 background_checkpoints):
  epochs = 3
  reference = str(tmp_path / "reference")
  subprocess.run(_train_command(reference, epochs, batch_preparation, "off"), check=True,
                 cwd=REPO, timeout=600)

  interrupted = str(tmp_path / "interrupted")
  command = _train_command(interrupted, epochs, batch_preparation, background_checkpoints)
  process = subprocess.Popen(command, cwd=REPO)
  deadline = time.time() + 300
  # 2 x 2 buckets per epoch: stop in the middle of the second epoch.
  while _bucket_lines(interrupted) < 6 and time.time() < deadline:
    assert process.poll() is None, "training finished before it could be killed"
    time.sleep(0.01)
  process.send_signal(signal.SIGKILL)
  process.wait()
  meta = checkpoint_lib.Checkpointer(interrupted).restore_meta()
  assert meta["cursor"]["epoch"] < epochs  # really interrupted

  subprocess.run(command, check=True, cwd=REPO, timeout=600)
  ours, theirs = committed_tables(interrupted), committed_tables(reference)
  for entity_type in theirs:
    np.testing.assert_array_equal(ours[entity_type], theirs[entity_type])


def test_eval_cli_prints_json(demo_run, capsys):
  _, workdir = demo_run
  assert cli.main(["eval", "--workdir", workdir, "--split", "test", "--json"]) == 0
  metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  for key in ("mrr", "mr", "hits@1", "hits@3", "hits@10"):
    assert isinstance(metrics[key], float)


def test_cli_overrides_and_errors(tmp_path, capsys):
  config = config_lib.load_config(os.path.join(REPO, "configs", "demo.py:test"),
                           ["--config.train.lr=0.05", "--config.train.bucket_order=random"])
  assert config.train.lr == 0.05 and config.train.bucket_order == "random"
  with pytest.raises(ValueError, match="unknown field"):
    config_lib.load_config(os.path.join(REPO, "configs", "demo.py:test"), ["--config.train.nope=1"])
  code = cli.main(["train", "--config", os.path.join(REPO, "configs", "demo.py:test"),
                   "--workdir", str(tmp_path / "w"), "--config.train.bucket_order=zigzag"])
  assert code == 2
  assert "train.bucket_order" in capsys.readouterr().err
  assert cli.main(["eval", "--workdir", str(tmp_path / "missing")]) == 2


def test_half_written_checkpoint_is_ignored(demo_run, tmp_path):
  """A save killed half-way (Orbax's temporary directory) never becomes the
  checkpoint; the run resumes from the last complete one."""
  import shutil
  trainer, workdir = demo_run
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  step = checkpoint_lib.Checkpointer(copy).latest_step()
  partial = os.path.join(copy, checkpoint_lib.CHECKPOINT_DIR,
                         f"{step + 1}.orbax-checkpoint-tmp-1234567")
  os.makedirs(os.path.join(partial, "state"))
  with open(os.path.join(partial, "state", "garbage"), "w") as f:
    f.write("half a checkpoint")
  resumed = train_lib.Trainer(demo_config.get_config("test"), copy, progress=False)
  assert resumed.cursor == {"epoch": trainer.config.train.epochs, "bucket": 0}
  before = committed_tables(workdir)
  after = resumed.embeddings()
  resumed.close()
  for entity_type in before:
    np.testing.assert_array_equal(before[entity_type], after[entity_type])


def test_checkpoint_without_meta_is_reported_by_path(demo_run, tmp_path):
  import shutil
  _, workdir = demo_run
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  step = checkpoint_lib.Checkpointer(copy).latest_step()
  meta_dir = os.path.join(copy, checkpoint_lib.CHECKPOINT_DIR, str(step), "meta")
  shutil.rmtree(meta_dir)
  with pytest.raises(FileNotFoundError, match=str(step)):
    train_lib.Trainer(demo_config.get_config("test"), copy, progress=False)


def test_export_cli_writes_every_type(demo_run, tmp_path, capsys):
  from twhin_jax import export
  trainer, workdir = demo_run
  out = str(tmp_path / "export")
  assert cli.main(["export", "--workdir", workdir, "--out", out, "--quiet"]) == 0
  tables = committed_tables(workdir)
  for entity_type, table in tables.items():
    names, vectors = export.read_parquet(os.path.join(out, f"{entity_type}.parquet"))
    assert names == trainer.graph.names(entity_type)
    np.testing.assert_array_equal(vectors, table)
    np.testing.assert_array_equal(np.load(os.path.join(out, f"{entity_type}.npy")), table)
  with open(os.path.join(out, "relations.json")) as f:
    relations = json.load(f)
  assert len(relations["relations"] if isinstance(relations, dict) else relations) == len(
      trainer.graph.relations)


def test_compilation_cache_is_on_by_default_and_can_be_turned_off(tmp_path):
  """A fresh process that trains nothing but jits one function leaves a
  program in TWHIN_JAX_CACHE_DIR; "off" leaves JAX without a cache directory."""
  script = ("import jax, jax.numpy as jnp\n"
            "from twhin_jax import train\n"
            "print(train.enable_compilation_cache())\n"
            "jax.jit(lambda x: jnp.sin(x) * 3)(jnp.arange(7.0)).block_until_ready()\n"
            "print(jax.config.jax_compilation_cache_dir)\n")
  cache = tmp_path / "cache"
  env = dict(os.environ, TWHIN_JAX_CACHE_DIR=str(cache), JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO)
  out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                       timeout=300, check=True)
  assert out.stdout.split() == [str(cache), str(cache)]
  assert any(cache.iterdir()), "no compiled program was written"
  env[train_lib.COMPILATION_CACHE_ENV] = "off"
  out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                       timeout=300, check=True)
  assert out.stdout.split() == ["None", "None"]
  env.pop(train_lib.COMPILATION_CACHE_ENV)
  env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
  out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                       timeout=300, check=True)
  assert out.stdout.split()[0] == str(tmp_path / "xdg" / "twhin_jax" / "jax_cache")
