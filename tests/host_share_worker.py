"""Run by tests/test_bucket_index.py as each of 2 processes (jax.distributed,
2 fake CPU devices each): trains the demo's tiny graph twice, once reading
only this process's cells of every bucket and once reading whole buckets
(batching.USE_BUCKET_INDEX), and prints one JSON line with the edges and
bytes this process read in each run."""

import json
import os
import sys

from twhin_jax import batching
from twhin_jax import bucket_index
from twhin_jax import demo_config
from twhin_jax import distributed
from twhin_jax import train as train_lib


def main():
  base, schedule, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
  distributed.initialize()
  out = {}
  for name, use_index in (("cells", True), ("whole", False)):
    config = demo_config.get_config("test")
    config.train.epochs = epochs
    config.train.eval_every_epochs = 0
    config.mesh.schedule = schedule
    batching.USE_BUCKET_INDEX = use_index
    bucket_index.READ_STATS.reset()
    trainer = train_lib.train(config, os.path.join(base, name), progress=False)
    out[name] = {"edges": bucket_index.READ_STATS.edges, "bytes": bucket_index.READ_STATS.bytes,
                 "kept": bucket_index.READ_STATS.kept,
                 "train_edges": sum(record["edges"] for record in trainer.history)}
    trainer.close()
  print("HOST_SHARE " + json.dumps(out), flush=True)


if __name__ == "__main__":
  main()
