"""Nations (kg/nations): 14 countries, 55 relations; 1,592 / 199 / 201
train / valid / test triples. With only 14 entities, ranking is coarse: watch
Hits@1 rather than MRR."""

from twhin_jax import config_builders


def get_config(variant: str = ""):
  return config_builders.kg_config("nations", "$TWHIN_DATA_DIR/kg/nations", epochs=50,
                            variant=variant)
