"""HetRec 2011 Last.fm (social/hetrec2011-lastfm-2k): 1,892 users, 17,632
artists, 11,946 tags.

Relations: friend (user -> user; each friendship is stored in both
directions), listened (user -> artist), and three views of the tag
assignments (user, artist, tag): tagged (user -> artist), has_tag (artist ->
tag), uses_tag (user -> tag). The tag files repeat pairs (an artist gets a tag
from many users), so these relations hold duplicate edges.

``listened`` is left unweighted: its weight column is a raw play count (1 to
~350,000), which as a loss weight would let a few heavy listeners dominate;
the file spec has no transform (e.g. log1p) to tame it.

The dataset has no split: 5% + 5% of the edges of every file are held out for
validation and test (seeded by train.seed).
"""

from twhin_jax import config as config_lib
from twhin_jax import config_builders
from twhin_jax import recipes

ROOT = "$TWHIN_DATA_DIR/social/hetrec2011-lastfm-2k"


def get_config(variant: str = ""):
  config = config_lib.base_config()
  config.name = "lastfm"
  for name in ("user", "artist", "tag"):
    config.entities[name] = config_builders.entity_type()
  config.relations = [
      config_builders.relation("friend", "user", "user"),
      config_builders.relation("listened", "user", "artist"),
      config_builders.relation("tagged", "user", "artist"),
      config_builders.relation("has_tag", "artist", "tag"),
      config_builders.relation("uses_tag", "user", "tag"),
  ]

  def spec(file, relation, source, target):
    return config_lib.file_spec(f"{ROOT}/{file}", header=True, source=source, target=target,
                                relation=None, relation_name=relation)

  config.data.files = [
      spec("user_friends.dat", "friend", 0, 1),
      spec("user_artists.dat.gz", "listened", 0, 1),
      spec("user_taggedartists.dat.gz", "tagged", 0, 1),
      spec("user_taggedartists.dat.gz", "has_tag", 1, 2),
      spec("user_taggedartists.dat.gz", "uses_tag", 0, 2),
  ]
  config.data.names_global = False  # users, artists and tags are all numbered from 1
  config.data.valid_fraction = 0.05
  config.data.test_fraction = 0.05
  recipes.apply(config, "social")
  return config_builders.apply_variant(config, variant)
