"""Request and response models of ``twhin serve`` (pydantic v2).

They are the one description of the API: FastAPI validates every request
body against them and builds the OpenAPI document (``/openapi.json``, and
the page at ``/docs``) from them.

Requests are strict (``"k": "10"``, ``"k": true`` and ``"name": 17`` are
refused, not coerced) and closed (an unknown field is refused, so a typo
is never silently ignored). Bounds keep one request's work bounded: k in
[1, MAX_K], at most MAX_NAMES names, MAX_TRIPLES triples and
MAX_ENGAGEMENTS engagements. What needs the run (does this type, relation
or name exist?) is checked by the service (serve.py).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pydantic
from pydantic import Field

MAX_K = 1000
MAX_NAMES = 1000
MAX_TRIPLES = 10_000
MAX_ENGAGEMENTS = 10_000

_REQUEST = pydantic.ConfigDict(strict=True, extra="forbid")

K = Annotated[int, Field(ge=1, le=MAX_K, description="how many results")]
Names = Annotated[list[str], Field(min_length=1, max_length=MAX_NAMES)]
Triple = Annotated[list[str], Field(min_length=3, max_length=3,
                                    description="[source name, relation, target name]")]
Engagement = Annotated[list[str], Field(min_length=2, max_length=2,
                                        description="[relation, target name]")]


class NeighborsRequest(pydantic.BaseModel):
  model_config = _REQUEST
  entity_type: str
  name: str
  relation: str | None = Field(None, description=(
      "rank this relation's other end by f(s, r, t); absent: same-type neighbours by the "
      "comparator"))
  k: K = 10
  direction: Literal["forward", "reverse"] | None = Field(None, description=(
      "forward: name is the relation's source; reverse: its target (default: whichever "
      "end entity_type is)"))
  exact: bool = Field(False, description="exhaustive search instead of the ScaNN index")

  @pydantic.model_validator(mode="after")
  def _direction_needs_relation(self):
    if self.direction is not None and self.relation is None:
      raise ValueError("direction needs a relation")
    return self


class DiverseRequest(pydantic.BaseModel):
  model_config = _REQUEST
  entity_type: str = Field(description="the mixtures' source (user) type")
  target_type: str
  name: str | None = Field(None, description="a known entity (give this or engagements)")
  engagements: Annotated[list[Engagement], Field(min_length=1, max_length=MAX_ENGAGEMENTS)] | None = (
      Field(None, description="[relation, target name] pairs of a new entity"))
  k: K = 10
  exact: bool = False
  exclude: Annotated[list[str], Field(max_length=MAX_NAMES)] = Field(
      default_factory=list, description="target names never returned")
  personal: bool | None = Field(None, description=(
      "rank each cluster's members by the entity's own query vector (default with 'name'); "
      "false: by the cluster's vector"))

  @pydantic.model_validator(mode="after")
  def _one_source(self):
    if (self.name is None) == (self.engagements is None):
      raise ValueError("give exactly one of 'name' and 'engagements'")
    if self.personal and self.name is None:
      raise ValueError("'personal' needs 'name' (an entity with a trained vector)")
    return self


class ScoreRequest(pydantic.BaseModel):
  model_config = _REQUEST
  triples: Annotated[list[Triple], Field(min_length=1, max_length=MAX_TRIPLES)]


class EmbeddingRequest(pydantic.BaseModel):
  model_config = _REQUEST
  entity_type: str
  names: Names


class ReloadRequest(pydantic.BaseModel):
  model_config = _REQUEST
  force: bool = Field(False, description="reload even if the latest checkpoint is served")


# Responses.


class Error(pydantic.BaseModel):
  error: str


class Ranked(pydantic.BaseModel):
  rank: int
  name: str
  id: int
  score: float


class NeighborsResponse(pydantic.BaseModel):
  entity_type: str
  name: str
  relation: str | None
  direction: str | None
  target_type: str
  exact: bool
  version_id: str
  neighbors: list[Ranked]


class MixtureWeight(pydantic.BaseModel):
  cluster: int
  weight: float


class DiverseRanked(Ranked):
  cluster: int


class DiverseResponse(pydantic.BaseModel):
  entity_type: str
  target_type: str
  version_id: str
  mixture: list[MixtureWeight]
  results: list[DiverseRanked]


class ScoreResponse(pydantic.BaseModel):
  comparator: str
  version_id: str
  scores: list[float]


class Embedding(pydantic.BaseModel):
  name: str
  vector: list[float]


class EmbeddingResponse(pydantic.BaseModel):
  entity_type: str
  dim: int
  version_id: str
  embeddings: list[Embedding]


class ReloadResponse(pydantic.BaseModel):
  reloaded: bool
  version_id: str
  checkpoint: dict[str, Any]
  previous: dict[str, Any] | None = None
  load_seconds: float | None = None


class Counts(pydantic.BaseModel):
  entities: dict[str, int]
  relations: int


class Health(pydantic.BaseModel):
  status: str
  version_id: str
  checkpoint: dict[str, Any]
  loaded_at: str
  load_seconds: float
  started_at: str
  counts: Counts
  indexes: dict[str, str]
  requests: int
  errors: int
  reloads: int
  last_reload_error: str | None


class Version(pydantic.BaseModel):
  version_id: str | None
  parent_id: str | None
  graph_manifest_hash: str | None
  config_hash: str | None
  created: str | None
  checkpoint: dict[str, Any]
  comparator: str
  reciprocal: bool
  relations: list[dict[str, Any]]
