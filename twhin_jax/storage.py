"""Entity tables on disk: TensorStore (zarr) arrays, one partition at a time.

For every entity type there are two *slots*, each a pair of arrays

  <root>/<type>/slot<k>/embeddings   float32 [P * S', d]
  <root>/<type>/slot<k>/adagrad      float32 [P * S'], or [P * S', d] with
                                     one accumulator per coordinate

where S' is the partition size S rounded up to a whole number of chunks, so a
partition is a set of whole chunks (partition p holds rows [p S', p S' + S_p)).
A table made for G devices (``sub_partitions``) uses chunks of at most
ceil(S / G) rows, so the hosts of a multi-host run, each writing the
sub-partitions of its own devices (sharding.py), never share a chunk.

Why two slots: a checkpoint must name a consistent version of every partition,
yet training keeps writing partitions back. Writes therefore always go to the
slot that the last checkpoint does *not* reference (copy-on-write with two
buffers); the checkpoint records, per partition, which slot holds its
committed values. A crash at any moment leaves the committed slots intact, and
resuming reads exactly them. ``SlotMap`` tracks this.

Backends. ``EntityStorage`` is the interface the trainer, the warm start and
the readers of a run use (modelled on PyTorch-BigGraph's
AbstractEntityStorage); ``TableStore`` (TensorStore zarr, driver name
"tensorstore") is its one implementation. A new backend subclasses
``EntityStorage`` here, registers itself with ``@register_storage("name")``
and is chosen by ``config.storage.driver``;
every caller builds a store through :func:`open_storage` with keyword
arguments.
"""

from __future__ import annotations

import abc
import concurrent.futures
import ctypes
import ctypes.util
import dataclasses
import functools
import math
import os
import threading

import numpy as np
import tensorstore as ts

from twhin_jax.graph import EntityInfo

#: Upper bound on rows per zarr chunk (1M x 128 floats per partition would be
#: one 512 MB chunk otherwise; smaller chunks keep random row reads cheap).
MAX_CHUNK_ROWS = 65536

Block = tuple[str, int]  # (entity type, partition)


def chunk_rows(partition_size: int, sub_partitions: int = 1) -> int:
  """Rows per chunk: a sub-partition (ceil(S / G) rows) if small, else split evenly."""
  size = max(math.ceil(partition_size / sub_partitions), 1)
  pieces = math.ceil(size / MAX_CHUNK_ROWS)
  return math.ceil(size / pieces)


#: XLA's CPU client uses a host array in place, without a copy, when it is
#: this aligned (TensorStore's own read arrays are 16 bytes off).
HOST_ALIGNMENT = 64


#: ``train.entity_accumulators``: one Adagrad accumulator per table row
#: (PyTorch-BigGraph's row-wise Adagrad, 1 float a row) or one per coordinate
#: (the Adagrad of torch.optim / optax, which the published ComplEx and
#: DistMult recipes use; d floats a row, so the tables' memory doubles).
ACCUMULATORS = ("row", "coordinate")


def accumulator_shape(rows: int, dim: int, per_coordinate: bool) -> tuple[int, ...]:
  """The accumulators of ``rows`` rows of dimension ``dim``: [rows] or [rows, dim]."""
  return (rows, dim) if per_coordinate else (rows,)


def convert_accumulators(acc: np.ndarray, dim: int, per_coordinate: bool) -> np.ndarray:
  """Accumulators [n] or [n, dim] in the other layout where needed (a warm
  start from a parent trained with the other kind). Row -> coordinate gives
  every coordinate the row's mean squared gradient, (1/d) sum_k g_k^2, the
  coordinates' expected value; coordinate -> row takes that mean."""
  if per_coordinate and acc.ndim == 1:
    return np.repeat(acc[:, None], dim, axis=1)
  if not per_coordinate and acc.ndim == 2:
    return acc.mean(axis=1, dtype=np.float32)
  return acc


def _empty_aligned(shape: tuple[int, ...]) -> np.ndarray:
  """An uninitialised float32 array at a HOST_ALIGNMENT-aligned address, so
  that rows read into it go to a CPU device without a copy (out-of-core
  loads read a partition per bucket)."""
  nbytes = math.prod(shape) * 4
  buffer = np.empty(nbytes + HOST_ALIGNMENT, np.uint8)
  skip = -buffer.ctypes.data % HOST_ALIGNMENT
  return buffer[skip:skip + nbytes].view(np.float32).reshape(shape)


def _all_finite(values: np.ndarray) -> bool:
  """Whether every value is finite, in one pass without a temporary array:
  a NaN or an infinity makes the sum NaN or infinite, so a finite sum
  proves them all finite; only a sum that overflows (or a real NaN) takes
  the exact, slower check."""
  with np.errstate(over="ignore", invalid="ignore"):
    if np.isfinite(values.sum()):
      return True
  return bool(np.all(np.isfinite(values)))


def stored_partition_size(partition_size: int, chunk: int | None = None) -> int:
  rows = chunk_rows(partition_size) if chunk is None else chunk
  return math.ceil(partition_size / rows) * rows


def _spec(path: str, shape: list[int], chunks: list[int], zarr_format: int) -> dict:
  kvstore = {"driver": "file", "path": path}
  if zarr_format == 3:
    return {"driver": "zarr3", "kvstore": kvstore,
            "metadata": {"shape": shape, "data_type": "float32",
                         "chunk_grid": {"name": "regular",
                                        "configuration": {"chunk_shape": chunks}}}}
  return {"driver": "zarr", "kvstore": kvstore,
          "metadata": {"shape": shape, "chunks": chunks, "dtype": "<f4", "compressor": None}}


@dataclasses.dataclass
class SlotMap:
  """Which slot holds each partition: the committed (checkpointed) and the
  current (latest written) versions."""
  committed: dict[Block, int]
  current: dict[Block, int]

  @classmethod
  def fresh(cls, blocks: list[Block]) -> "SlotMap":
    return cls({b: 0 for b in blocks}, {b: 0 for b in blocks})

  def write_target(self, block: Block) -> int:
    """The slot a write of ``block`` must go to: never the committed one."""
    return 1 - self.committed[block]

  def commit(self) -> None:
    self.committed = dict(self.current)

  def to_json(self) -> dict[str, int]:
    return {f"{t}/{p}": s for (t, p), s in self.committed.items()}

  @classmethod
  def from_json(cls, data: dict[str, int]) -> "SlotMap":
    committed = {}
    for key, slot in data.items():
      entity_type, partition = key.rsplit("/", 1)
      committed[(entity_type, int(partition))] = int(slot)
    return cls(committed, dict(committed))


class EntityStorage(abc.ABC):
  """The entity tables of a run: per type and partition, two slots of
  (embeddings [rows, d], Adagrad accumulators [rows], or [rows, d] with
  ``coordinate_accumulators``).

  Attributes every backend sets: ``entities`` (type -> EntityInfo), ``dims``
  (type -> d), ``chunk`` (type -> rows per storage chunk: hosts of a
  multi-host run never share one) and ``stored`` (type -> stored rows per
  partition, >= its partition size). ``coordinate_accumulators``: one
  Adagrad accumulator per coordinate (``train.entity_accumulators =
  "coordinate"``) instead of one per row.
  """
  entities: dict[str, EntityInfo]
  dims: dict[str, int]
  chunk: dict[str, int]
  stored: dict[str, int]
  coordinate_accumulators: bool = False

  def accumulator_shape(self, entity_type: str, rows: int) -> tuple[int, ...]:
    """The accumulators of ``rows`` rows of a type: [rows] or [rows, d]."""
    return accumulator_shape(rows, self.dims[entity_type], self.coordinate_accumulators)

  def blocks(self) -> list[Block]:
    return [(t, p) for t, info in self.entities.items() for p in range(info.num_partitions)]

  @abc.abstractmethod
  def read_rows(self, block: Block, slot: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows [lo, hi) of one partition: (embeddings [n, d], adagrad [n])."""

  @abc.abstractmethod
  def write_rows(self, block: Block, slot: int, lo: int, embeddings: np.ndarray,
                 adagrad: np.ndarray, *, frozen: bool = False) -> list:
    """Starts writing rows [lo, lo + n) of one partition; returns futures
    (objects with ``result()``). Must refuse NaN or inf before writing.

    ``frozen``: the caller never changes the two arrays afterwards, so the
    backend may write from them instead of from a copy of its own."""

  def sync(self) -> None:
    """Makes every finished write durable (on disk, not only in the
    operating system's cache), before a checkpoint names it. A backend whose
    writes are durable when they finish has nothing to do."""

  def read(self, block: Block, slot: int) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings [rows, d], adagrad [rows]) of one partition."""
    return self.read_rows(block, slot, 0, self.entities[block[0]].partition_rows(block[1]))

  def write(self, block: Block, slot: int, embeddings: np.ndarray, adagrad: np.ndarray) -> list:
    """Starts writing one whole partition; returns the futures to wait on."""
    rows = self.entities[block[0]].partition_rows(block[1])
    if embeddings.shape[0] != rows or adagrad.shape[0] != rows:
      raise ValueError(f"partition {block}: expected {rows} rows, "
                       f"got {embeddings.shape[0]} / {adagrad.shape[0]}")
    return self.write_rows(block, slot, 0, embeddings, adagrad)

  def initialize(self, seed: int, init_scale: float, progress=None) -> None:
    """Random N(0, init_scale^2) rows and zero accumulators in slot 0,
    partition by partition (seeded per type and partition)."""
    for index, block in enumerate(self.blocks()):
      rows = self.entities[block[0]].partition_rows(block[1])
      rng = np.random.default_rng([seed, index, 0x1A17])
      emb = (rng.standard_normal((rows, self.dims[block[0]]), np.float32)
             * np.float32(init_scale))
      for future in self.write(block, 0, emb,
                               np.zeros(self.accumulator_shape(block[0], rows), np.float32)):
        future.result()
      if progress is not None:
        progress.update(1)

  def read_type(self, entity_type: str, slots: SlotMap, use_committed: bool = False) -> np.ndarray:
    """The whole table of one type [count, d], from the current (or committed) slots."""
    info = self.entities[entity_type]
    source = slots.committed if use_committed else slots.current
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
      parts = list(pool.map(lambda p: self.read((entity_type, p), source[(entity_type, p)])[0],
                            range(info.num_partitions)))
    return np.concatenate(parts, axis=0) if parts else np.zeros((0, self.dims[entity_type]))


@functools.cache
def _libc() -> ctypes.CDLL | None:
  """The C library (for syncfs), or None where ctypes cannot find one."""
  name = ctypes.util.find_library("c")
  return ctypes.CDLL(name, use_errno=True) if name else None


_DRIVERS: dict[str, type[EntityStorage]] = {}
DEFAULT_DRIVER = "tensorstore"


def register_storage(name: str):
  """Class decorator: makes an ``EntityStorage`` available as ``config.storage.driver``."""
  def register(cls):
    if name in _DRIVERS and _DRIVERS[name] is not cls:
      raise ValueError(f"storage driver {name!r} is already registered ({_DRIVERS[name]})")
    _DRIVERS[name] = cls
    return cls
  return register


def storage_drivers() -> tuple[str, ...]:
  return tuple(sorted(_DRIVERS))


def open_storage(driver: str, root: str, *, entities: dict[str, EntityInfo],
                 dims: dict[str, int], create: bool = False, sub_partitions: int = 1,
                 num_slots: int = 2, **options) -> EntityStorage:
  """Opens (or with ``create`` makes, replacing) the tables under ``root``.

  Args:
    driver: a registered name (``config.storage.driver``).
    entities, dims: the types' sizes and dimensions.
    sub_partitions: devices a partition is sharded over (chunks never straddle them).
    num_slots: 2 for working tables (copy-on-write), 1 for read-only copies.
    options: backend options (TensorStore: ``zarr_format``).
  """
  if driver not in _DRIVERS:
    raise ValueError(f"config.storage.driver: {driver!r} not in {storage_drivers()}")
  return _DRIVERS[driver](root, entities, dims, create=create, sub_partitions=sub_partitions,
                          num_slots=num_slots, **options)


@register_storage("tensorstore")
class TableStore(EntityStorage):
  """The TensorStore arrays of every entity type, read and written by partition."""

  def __init__(self, root: str, entities: dict[str, EntityInfo], dims: dict[str, int], *,
               zarr_format: int = 3, create: bool = False, sub_partitions: int = 1,
               num_slots: int = 2, coordinate_accumulators: bool = False,
               sync_each_write: bool = True):
    """``coordinate_accumulators`` shapes the tables made with ``create``;
    opened tables keep the accumulators they were made with.

    ``sync_each_write``: every write is on disk when its future is done
    (TensorStore's default: an fsync per chunk file). Without it writes end
    in the operating system's cache and ``sync`` makes them durable at once;
    a killed process loses nothing either way, a crashed machine only what
    no ``sync`` covered. On this machine 1.5 GiB in 32 MB chunks took 5.1 s
    with an fsync per write and 2.6 s without (one thread; 0.7 s with 4),
    plus 2.8 s for the one sync."""
    self.root = root
    self.sync_each_write = sync_each_write
    context = ts.Context({"file_io_sync": sync_each_write})
    self.entities = entities
    self.dims = dims
    self.zarr_format = zarr_format
    self.coordinate_accumulators = coordinate_accumulators
    self._arrays: dict[tuple[str, int, str], ts.TensorStore] = {}
    self._lock = threading.Lock()
    #: Rows per zarr chunk and stored rows per partition, per type.
    self.chunk: dict[str, int] = {}
    self.stored: dict[str, int] = {}
    for entity_type, info in entities.items():
      rows = chunk_rows(info.partition_size, sub_partitions)
      if not create:
        existing = self._existing_accumulators(root, entity_type, zarr_format)
        if existing is not None:
          rows, self.coordinate_accumulators = existing
      stored = stored_partition_size(info.partition_size, rows)
      self.chunk[entity_type], self.stored[entity_type] = rows, stored
      accumulators = self.accumulator_shape(entity_type, info.num_partitions * stored)
      for slot in range(num_slots):
        base = os.path.join(root, entity_type, f"slot{slot}")
        for name, shape, chunks in (
            ("embeddings", [info.num_partitions * stored, dims[entity_type]],
             [rows, dims[entity_type]]),
            ("adagrad", list(accumulators), [rows, *accumulators[1:]])):
          spec = _spec(os.path.join(base, name), shape, chunks, zarr_format)
          if create:
            spec.update(create=True, delete_existing=True)
          else:
            spec.update(open=True)
          try:
            self._arrays[(entity_type, slot, name)] = ts.open(spec, context=context).result()
          except ValueError as err:
            raise FileNotFoundError(f"{base}/{name}: cannot open table ({err})") from err

  def sync(self) -> None:
    """Flushes the operating system's cache of the tables' file system to
    disk (syncfs; os.sync where the C library has none): one call for all
    the chunk files written since the last."""
    if self.sync_each_write:
      return
    syncfs = getattr(_libc(), "syncfs", None)
    if syncfs is None:
      os.sync()
      return
    fd = os.open(self.root, os.O_RDONLY)
    try:
      if syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{self.root}: syncfs failed: {os.strerror(err)}")
    finally:
      os.close(fd)

  @staticmethod
  def _existing_accumulators(root: str, entity_type: str,
                             zarr_format: int) -> tuple[int, bool] | None:
    """(chunk rows, one accumulator per coordinate) of an existing table (it
    may have been made for another G or with the other accumulators)."""
    path = os.path.join(root, entity_type, "slot0", "adagrad")
    try:
      spec = {"driver": "zarr3" if zarr_format == 3 else "zarr",
              "kvstore": {"driver": "file", "path": path}, "open": True}
      array = ts.open(spec).result()
    except ValueError:
      return None  # reported by the open below, with the path
    # The write chunk is the chunk grid the table was made with; TensorStore
    # may read a large one in smaller inner chunks (zarr3 sharding), so the
    # read chunk of a [rows, d] array can be smaller.
    return int(array.chunk_layout.write_chunk.shape[0]), array.rank == 2

  def _rows(self, block: Block) -> tuple[int, int]:
    entity_type, partition = block
    info = self.entities[entity_type]
    start = partition * self.stored[entity_type]
    return start, start + info.partition_rows(partition)

  def read_rows(self, block: Block, slot: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows [lo, hi) of one partition: (embeddings [n, d], adagrad [n])."""
    start, stop = self._rows(block)
    hi = min(start + hi, stop)
    lo = min(start + lo, hi)
    entity_type = block[0]
    emb = _empty_aligned((hi - lo, self.dims[entity_type]))
    acc = _empty_aligned(self.accumulator_shape(entity_type, hi - lo))
    # Read into the aligned arrays (a TensorStore view of each, written from storage).
    reads = [ts.array(out, copy=False, write=True).write(
                 self._arrays[(entity_type, slot, name)][lo:hi])
             for out, name in ((emb, "embeddings"), (acc, "adagrad"))]
    for future in reads:
      future.result()
    return emb, acc

  def write_rows(self, block: Block, slot: int, lo: int, embeddings: np.ndarray,
                 adagrad: np.ndarray, *, frozen: bool = False) -> list[ts.Future]:
    """Starts writing rows [lo, lo + n) of one partition; returns the futures.

    Refuses NaN or inf before anything is written, so a diverged run never
    overwrites saved values. With ``frozen`` TensorStore writes straight
    from the arrays (can_reference_source_data_indefinitely): out-of-core
    write-backs, a partition per bucket, skip a copy of every row.
    """
    start, stop = self._rows(block)
    n = embeddings.shape[0]
    if adagrad.shape != self.accumulator_shape(block[0], n) or start + lo + n > stop:
      raise ValueError(f"partition {block}: rows [{lo}, {lo + n}) with accumulators "
                       f"{adagrad.shape} do not fit its {stop - start} rows "
                       f"(accumulators {self.accumulator_shape(block[0], n)})")
    if not _all_finite(adagrad):
      raise FloatingPointError(f"partition {block}: Adagrad accumulators hold NaN or inf; "
                               "refusing to overwrite the saved table")
    if not _all_finite(embeddings):
      bad = int(np.sum(~np.isfinite(embeddings).all(axis=1)))
      raise FloatingPointError(
          f"partition {block}: {bad} rows hold NaN or inf; refusing to overwrite "
          "the saved table (lower train.lr or check the edge weights)")
    entity_type = block[0]
    lo = start + lo
    return [self._arrays[(entity_type, slot, "embeddings")][lo:lo + n].write(
                embeddings, can_reference_source_data_indefinitely=frozen),
            self._arrays[(entity_type, slot, "adagrad")][lo:lo + n].write(
                adagrad, can_reference_source_data_indefinitely=frozen)]
