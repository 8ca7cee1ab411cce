"""FB15k-237 (kg/fb15k-237): 14,541 Freebase entities, 237 relations;
272,115 / 17,535 / 20,466 train / valid / test triples (gzipped, CRLF line
endings, handled by the importer). The standard mid-sized KG benchmark."""

from twhin_jax import datasets


def get_config(variant: str = ""):
  return datasets.kg_config("fb15k237", "$TWHIN_DATA_DIR/kg/fb15k-237", suffix=".txt.gz",
                            epochs=20, variant=variant)
