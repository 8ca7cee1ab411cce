"""Flickr social recommendation (social/diffnet-flickr, DiffNet): 8,358 users,
82,120 images; 187,273 follow links and 282,444 / 13,006 / 32,365
train / valid / test user-image interactions (the dataset's own split; the
links are all train).

The files end in ``.links`` / ``.rating`` (gzipped), so the format is given.
Their third column is always 1 and is ignored.
"""

from twhin_jax import config as config_lib
from twhin_jax import config_builders
from twhin_jax import recipes

ROOT = "$TWHIN_DATA_DIR/social/diffnet-flickr"


def get_config(variant: str = ""):
  config = config_lib.base_config()
  config.name = "flickr"
  config.entities.user = config_builders.entity_type()
  config.entities.image = config_builders.entity_type()
  config.relations = [config_builders.relation("follows", "user", "user"),
                      config_builders.relation("interacts", "user", "image")]

  def spec(file, relation, split="train"):
    return config_lib.file_spec(f"{ROOT}/{file}", format="tsv", split=split, source=0,
                                target=1, relation=None, relation_name=relation)

  config.data.files = [
      spec("flickr.links.gz", "follows"),
      spec("flickr.train.rating.gz", "interacts", "train"),
      spec("flickr.val.rating.gz", "interacts", "valid"),
      spec("flickr.test.rating.gz", "interacts", "test"),
  ]
  config.data.names_global = False  # users and images are both numbered from 0
  recipes.apply(config, "social")
  return config_builders.apply_variant(config, variant)
