"""Ciao (social/ciao-tang2012): users, products and product categories.

Relations: trust (user -> user), rated_1 .. rated_5 (user -> product, one
relation per star rating, from the rating column) and in_category (product
-> category, from the same rating rows: one duplicate edge per rating of the
product). Note the category is also Ciao's node-classification label; drop
in_category from a run that evaluates category prediction.

34 ratings are 0 (no relation rated_0): ``on_error="skip"`` drops and counts
them. The dataset has no split: 5% + 5% of the edges of every file are held
out for validation and test (seeded by train.seed).
"""

from twhin_jax import config as config_lib
from twhin_jax import config_builders
from twhin_jax import recipes

ROOT = "$TWHIN_DATA_DIR/social/ciao-tang2012"
STARS = range(1, 6)


def get_config(variant: str = ""):
  config = config_lib.base_config()
  config.name = "ciao"
  for name in ("user", "product", "category"):
    config.entities[name] = config_builders.entity_type()
  config.relations = (
      [config_builders.relation("trust", "user", "user")]
      + [config_builders.relation(f"rated_{k}", "user", "product") for k in STARS]
      + [config_builders.relation("in_category", "product", "category")])
  # rating.tsv.gz columns: userid, productid, categoryid, rating, helpfulness.
  config.data.files = [
      config_lib.file_spec(f"{ROOT}/trustnetwork.tsv.gz", source=0, target=1, relation=None,
                           relation_name="trust"),
      config_lib.file_spec(f"{ROOT}/rating.tsv.gz", source=0, target=1, relation=3,
                           relation_name="rated_{}"),
      config_lib.file_spec(f"{ROOT}/rating.tsv.gz", source=1, target=2, relation=None,
                           relation_name="in_category"),
  ]
  config.data.names_global = False  # user, product and category ids overlap
  config.data.on_error = "skip"
  config.data.valid_fraction = 0.05
  config.data.test_fraction = 0.05
  recipes.apply(config, "social")
  return config_builders.apply_variant(config, variant)
