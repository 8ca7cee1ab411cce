"""Run in its own process by tests/test_sharded.py (jax must see 8 CPU devices
before it is imported): trains the demo's tiny graph on 1 and on 8 devices and
prints one JSON object with both runs' metrics and the 8-device shardings."""

import json
import sys
import tempfile

import jax

from twhin_jax import demo_config
from twhin_jax import train as train_lib


def run(num_devices: int, workdir: str):
  config = demo_config.get_config("test")
  config.mesh.num_devices = num_devices
  config.train.eval_every_epochs = 0
  trainer = train_lib.train(config, workdir, progress=False)
  metrics = trainer.evaluate("test", progress=False)
  # Load one bucket so the working tables exist again, then describe them.
  trainer.residency.load((0, 1))
  report = train_lib.sharding_report(trainer)
  result = {"mrr": metrics["mrr"], "hits@10": metrics["hits@10"], "auc": metrics["auc"],
            "edges": trainer.history[-1]["edges"], "loss": trainer.history[-1]["loss"]}
  trainer.close()
  return result, report


def main():
  if jax.device_count() < 8:
    sys.exit(f"needs 8 devices, jax sees {jax.device_count()}")
  one, _ = run(1, tempfile.mkdtemp())
  eight, report = run(8, tempfile.mkdtemp())
  print(json.dumps({"one": one, "eight": eight, "shardings": report}))


if __name__ == "__main__":
  main()
