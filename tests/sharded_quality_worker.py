"""Run in its own process by tests/test_sharded_quality.py (jax must see the
fake CPU devices before it is imported): trains Kinship (configs/kinship.py)
on 1 device and on G devices with the tournament schedule and prints one JSON
object with both runs' test MRR.

  python tests/sharded_quality_worker.py G [--config.x=y ...]
"""

import json
import os
import sys
import tempfile

import jax

from twhin_jax import config as config_lib
from twhin_jax import train as train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(num_devices: int, overrides: list[str], workdir: str) -> dict:
  config = config_lib.load_config(os.path.join(REPO, "configs", "kinship.py"), overrides)
  config.mesh.num_devices = num_devices
  trainer = train_lib.train(config, workdir, progress=False)
  metrics = trainer.evaluate("test", progress=False)
  result = {"mrr": metrics["mrr"], "loss": [h["loss"] for h in trainer.history]}
  trainer.close()
  return result


def main():
  devices, overrides = int(sys.argv[1]), sys.argv[2:]
  if jax.device_count() < devices:
    sys.exit(f"needs {devices} devices, jax sees {jax.device_count()}")
  print(json.dumps({"one": run(1, overrides, tempfile.mkdtemp()),
                    "many": run(devices, overrides, tempfile.mkdtemp())}))


if __name__ == "__main__":
  main()
