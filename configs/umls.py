"""UMLS (kg/umls): 135 biomedical concepts, 46 relations; 5,216 / 652 / 661
train / valid / test triples."""

from twhin_jax import config_builders


def get_config(variant: str = ""):
  return config_builders.kg_config("umls", "$TWHIN_DATA_DIR/kg/umls", epochs=50, variant=variant)
