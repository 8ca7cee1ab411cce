"""Downstream models over frozen TwHIN embeddings (paper section 5.1, Table 2).

  metrics.py   ROC-AUC, PR-AUC (average precision), RCE (Eq. 4), MAP, multiclass
  model.py     frozen lookups (full or PQ-decoded) beside dense features, a Flax
               nnx MLP, an optax loop with early stopping on validation loss
  tasks.py     ciao_category, ciao_rating, lastfm_friends, entity_category (any
               labelled type from a file): one function per task,
               each taking an embedding source and a feature set, returning metrics

See docs/downstream.md for the design, the commands and the measured numbers.
"""

from twhin_jax.downstream.metrics import (average_precision, binary_metrics, log_loss,
                                          mean_average_precision, multiclass_metrics,
                                          relative_cross_entropy, roc_auc)
from twhin_jax.downstream.model import (DownstreamModel, Examples, FrozenEmbed, IdFeature,
                                        TrainConfig, build_model, predict, train_model)
from twhin_jax.downstream.tasks import (CATEGORY_FEATURE_SETS, ENTITY_FEATURE_SETS,
                                        FRIEND_FEATURE_SETS, RATING_FEATURE_SETS,
                                        ciao_category, ciao_config_without_category,
                                        ciao_rating, config_without_relations,
                                        entity_category, read_entity_labels,
                                        lastfm_config_with_held_out_friends, lastfm_friend_split,
                                        lastfm_friends, write_lastfm_train_friends)
