"""Kinship (kg/kinship): 104 people, 25 kinship terms; 8,544 / 1,068 / 1,074
train / valid / test triples. Tiny: runs in seconds, a first sanity check."""

from twhin_jax import config_builders


def get_config(variant: str = ""):
  return config_builders.kg_config("kinship", "$TWHIN_DATA_DIR/kg/kinship", epochs=50,
                            variant=variant)


def get_sweep():
  """Learning rate x dimension, 4 runs: `twhin sweep --config configs/kinship.py
  --workdir runs/kinship-sweep` (docs/sweeps.md)."""
  return {"train.lr": [0.05, 0.1], "model.dim": [100, 200]}
