"""The embedded default: a generated Twitter-like graph (no download needed).

Entity types user, tweet, advertiser, ad; relations follows, authors,
favorites, retweets, replies, promotes, clicks; power-law degrees and planted
communities (twhin_jax.generate.twitter_like). Variants:

  ""      ~1.8M edges, 20k users, 100k tweets; about 2-3 minutes on 2 cores
  "test"  a few thousand edges, seconds (CI)
"""

from twhin_jax import config as config_lib
from twhin_jax import generate


def get_config(variant: str = ""):
  c = config_lib.base_config()
  c.name = "demo" if not variant else f"demo-{variant}"
  c.data.generator = "twitter_like"
  if variant == "test":
    c.data.generator_args = dict(num_users=600, num_tweets=2000, num_advertisers=20,
                                 num_ads=100, num_communities=6, seed=0)
    num_partitions = 2
  elif variant == "":
    c.data.generator_args = dict(seed=0)
    num_partitions = 1
  else:
    raise ValueError(f"unknown demo variant {variant!r} (choose '' or 'test')")
  entities, relations = generate.twitter_like_schema(num_partitions=num_partitions)
  # Users and tweets are partitioned; the small advertiser/ad types are not.
  for name, entity in entities.items():
    if name in ("advertiser", "ad"):
      entity["num_partitions"] = 1
  c.entities = entities
  c.relations = relations
  c.data.valid_fraction = 0.01
  c.data.test_fraction = 0.01
  c.model.dim = 64
  c.train.epochs = 8 if not variant else 4
  c.train.lr = 0.1
  c.train.relation_lr = 0.01
  c.train.bucket_order = "inside_out"
  c.eval.max_triples = 2000  # per-epoch validation on a subsample
  return c
