"""Bucket files grouped by cell, so that each host reads only its own edges.

A bucket's edges go to devices by the sub-partitions of their endpoints
(sharding.py: the ring's stripes of sources, device_schedule.py: the
tournament's (source slot, target slot) squares). To let a process read only
what its devices train, the import writes every bucket's edges grouped by
*cell* on a fixed fine grid, random order inside a cell:

  cell(e) = (pair(r) * K + floor(src * K / S_src)) * K + floor(dst * K / S_dst)

with K = ``GRID`` blocks per side, r the edge's relation, pair(r) the index of
its (source type, target type) among the graph's type pairs, and S_src, S_dst
the partition sizes of those types (src, dst are offsets inside their
partitions, so a block is 1/K of a partition). ``buckets/<i>_<j>/cells.npy``
(int64 [pairs, K, K]) holds the edge count of every cell; the edges of cell c
are rows [start_c, start_(c+1)) of the bucket files, start = prefix sum of
the counts in cell order.

A process then reads the row ranges of the cells that overlap its devices'
sub-partitions (``needed_cells``, ``read_ranges``) and drops the few
boundary edges that belong to other devices; memory and I/O per process
scale as 1 / processes.

Since a cell's edges are still in the importer's seeded random order, a
uniform random sample of the bucket is a share of every cell
(``stratified_slices``): the one-device streaming path reads its slices that
way instead of runs of consecutive edges, which would now come from a
handful of cells.

``importer.index_buckets`` groups every bucket of a freshly imported graph in
place (a two-pass counting sort, ``GROUP_BLOCK_EDGES`` edges in memory at a
time, stable, so the order inside a cell is the importer's) and records the
grid in the manifest. Graph directories without ``cells.npy`` (older imports,
network views) are read whole, as before.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading

import numpy as np

#: Blocks per side of a partition in the cell grid. A device's sub-partition
#: of S / G rows covers S K / G blocks, so the boundary blocks a process reads
#: in excess are at most 2 / K of the bucket per stripe side (3% at K = 64).
GRID = 64
INDEX_FILE = "cells.npy"
#: Edges held at once while grouping a bucket (about 60 bytes each).
GROUP_BLOCK_EDGES = 1 << 20
COLUMNS = ("src", "dst", "rel", "weight")


@dataclasses.dataclass(frozen=True)
class CellGrid:
  """The cell of every edge of a graph's buckets (module doc)."""
  grid: int
  type_pairs: tuple[tuple[str, str], ...]
  pair_of: np.ndarray  # [R] type pair of each relation
  src_size: np.ndarray  # [R] partition size of the relation's source type
  dst_size: np.ndarray  # [R]

  @classmethod
  def of(cls, partition_sizes: dict[str, int], relations, grid: int = GRID) -> "CellGrid":
    """``partition_sizes``: type -> rows per partition; ``relations``: objects
    or dicts with a source and a target type, in the graph's order."""
    ends = [(r["source"], r["target"]) if isinstance(r, dict) else (r.source, r.target)
            for r in relations]
    pairs = tuple(dict.fromkeys(ends))  # first appearance order
    return cls(grid, pairs, np.asarray([pairs.index(e) for e in ends], np.int64),
               np.asarray([partition_sizes[s] for s, _ in ends], np.int64),
               np.asarray([partition_sizes[t] for _, t in ends], np.int64))

  @classmethod
  def of_manifest(cls, manifest: dict) -> "CellGrid":
    schema = manifest["schema"]
    sizes = {t: max(1, math.ceil(int(e["count"]) / int(e["num_partitions"])))
             for t, e in schema["entities"].items()}
    return cls.of(sizes, schema["relations"], int(manifest["bucket_index"]["grid"]))

  @property
  def num_cells(self) -> int:
    return len(self.type_pairs) * self.grid * self.grid

  def cells(self, src: np.ndarray, dst: np.ndarray, rel: np.ndarray) -> np.ndarray:
    """[E] int64 cell of each edge (offsets src, dst; relation index rel)."""
    rel = np.asarray(rel, np.int64)
    src_block = np.asarray(src, np.int64) * self.grid // self.src_size[rel]
    dst_block = np.asarray(dst, np.int64) * self.grid // self.dst_size[rel]
    return (self.pair_of[rel] * self.grid + src_block) * self.grid + dst_block

  def block_rows(self, partition_size: int) -> tuple[np.ndarray, np.ndarray]:
    """([K] first row, [K] end row) of each block of a partition of
    ``partition_size`` rows: block b holds offsets x with x K // S = b."""
    bounds = -(-np.arange(self.grid + 1, dtype=np.int64) * partition_size // self.grid)
    return bounds[:-1], bounds[1:]


# --------------------------------------------------------------------------
# Writing: group the buckets of an imported graph.


def group_bucket(directory: str, cell_grid: CellGrid,
                 block_edges: int = GROUP_BLOCK_EDGES) -> np.ndarray:
  """Rewrites a bucket's files grouped by cell (stable: each cell keeps the
  edges' present order) and writes ``cells.npy``; returns the counts
  [pairs, K, K].

  A counting sort in two passes over memory-mapped files: count the cells,
  then scatter every block of ``block_edges`` edges to its cells' next free
  rows of new files, which replace the old ones at the end."""
  names = [n for n in COLUMNS if os.path.exists(os.path.join(directory, f"{n}.npy"))]
  columns = {n: np.load(os.path.join(directory, f"{n}.npy"), mmap_mode="r") for n in names}
  num_edges, num_cells = len(columns["src"]), cell_grid.num_cells

  key_type = np.uint16 if num_cells <= 1 << 16 else np.int64  # numpy radix-sorts 16-bit keys

  def cells_of(a: int, b: int) -> np.ndarray:
    cells = cell_grid.cells(columns["src"][a:b], columns["dst"][a:b], columns["rel"][a:b])
    return cells.astype(key_type)

  if num_edges <= block_edges:  # the whole bucket in memory: one sort, sequential writes
    cell = cells_of(0, num_edges)
    by_cell = np.argsort(cell, kind="stable")
    for n in names:
      partial = os.path.join(directory, f".{n}.grouping.npy")
      np.save(partial, np.array(columns[n])[by_cell])  # read sequentially, then gather
    del columns
    for n in names:
      os.replace(os.path.join(directory, f".{n}.grouping.npy"), os.path.join(directory, f"{n}.npy"))
    counts = np.bincount(cell, minlength=num_cells).reshape(
        len(cell_grid.type_pairs), cell_grid.grid, cell_grid.grid)
    np.save(os.path.join(directory, INDEX_FILE), counts)
    return counts
  counts = np.zeros(num_cells, np.int64)
  for a in range(0, num_edges, block_edges):
    counts += np.bincount(cells_of(a, a + block_edges), minlength=num_cells)
  cursor = np.concatenate([[0], np.cumsum(counts)[:-1]])  # next free row of each cell
  partial = {n: os.path.join(directory, f".{n}.grouping.npy") for n in names}
  out = {n: np.lib.format.open_memmap(partial[n], mode="w+", dtype=columns[n].dtype,
                                      shape=(num_edges,)) for n in names}
  for a in range(0, num_edges, block_edges):
    cell = cells_of(a, a + block_edges)
    by_cell = np.argsort(cell, kind="stable")
    block_counts = np.bincount(cell, minlength=num_cells)
    first = np.concatenate([[0], np.cumsum(block_counts)[:-1]])  # of each cell in by_cell
    sorted_cell = cell[by_cell]
    # Row of the i-th edge of by_cell: its cell's next free row plus its rank
    # among the block's edges of that cell.
    row = cursor[sorted_cell] + np.arange(len(cell)) - first[sorted_cell]
    for n in names:
      out[n][row] = np.asarray(columns[n][a:a + block_edges])[by_cell]
    cursor += block_counts
  for n in names:
    out[n].flush()
  del out, columns
  for n in names:
    os.replace(partial[n], os.path.join(directory, f"{n}.npy"))
  counts = counts.reshape(len(cell_grid.type_pairs), cell_grid.grid, cell_grid.grid)
  np.save(os.path.join(directory, INDEX_FILE), counts)
  return counts


# --------------------------------------------------------------------------
# Reading.


def cell_starts(counts: np.ndarray) -> np.ndarray:
  """[num_cells + 1] first row of every cell (and the end), from cells.npy."""
  return np.concatenate([[0], np.cumsum(np.asarray(counts, np.int64).ravel())])


def unit_blocks(cell_grid: CellGrid, partition_size: int, unit_rows: int,
                num_units: int) -> np.ndarray:
  """[K, U] bool: block b of a partition overlaps unit u (rows [u * unit_rows,
  (u + 1) * unit_rows): a device's sub-partition, or a tournament slot)."""
  lo, hi = cell_grid.block_rows(partition_size)
  first = lo // unit_rows
  last = (np.maximum(hi, lo + 1) - 1) // unit_rows
  units = np.arange(num_units)
  return (hi > lo)[:, None] & (units[None, :] >= first[:, None]) & (units[None, :] <= last[:, None])


def needed_cells(src_blocks: np.ndarray, dst_blocks: np.ndarray, owned: np.ndarray) -> np.ndarray:
  """[K, K] bool: the cells of one type pair holding any edge of an owned
  (source unit, target unit) square (``owned`` [U_src, U_dst]), given each
  side's ``unit_blocks``."""
  hits = src_blocks.astype(np.int64) @ owned.astype(np.int64) @ dst_blocks.T.astype(np.int64)
  return hits > 0


def read_ranges(starts: np.ndarray, needed: np.ndarray) -> list[tuple[int, int]]:
  """Row ranges [a, b) of the needed cells (``needed`` [num_cells] bool),
  adjacent ones merged, empty ones dropped, in file order."""
  # An empty cell joins its neighbours' ranges (it adds no row).
  joined = np.asarray(needed, bool).ravel() | (np.diff(starts) == 0)
  edges = np.diff(np.concatenate([[0], joined.astype(np.int8), [0]]))
  first, end = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
  return [(int(starts[a]), int(starts[b])) for a, b in zip(first, end) if starts[b] > starts[a]]


def read_rows(edges: dict, ranges: list[tuple[int, int]]) -> dict[str, np.ndarray]:
  """The rows of ``ranges`` of every column of a (memory-mapped) bucket, in
  file order; counted in ``READ_STATS``."""
  out = {}
  for name, column in edges.items():
    pieces = [np.asarray(column[a:b]) for a, b in ranges]
    out[name] = (np.concatenate(pieces) if pieces else np.zeros(0, column.dtype))
  READ_STATS.count(edges, sum(b - a for a, b in ranges))
  return out


def stratified_slices(starts: np.ndarray, num_slices: int, rng: np.random.Generator
                      ) -> list[np.ndarray]:
  """Rows of ``num_slices`` slices that split the bucket, each a share of
  every cell: slice s takes positions [n_c s / m, n_c (s + 1) / m) of cell c
  (n_c edges, m slices) after a seeded rotation of the cell by a random
  fraction of its length, so that the slices change from epoch to epoch.
  Each slice is sorted (file order): consecutive slices read consecutive
  pieces of every cell."""
  counts = np.diff(starts)
  cells = np.flatnonzero(counts)
  counts, first = counts[cells], starts[cells]
  shift = np.floor(rng.random() * counts).astype(np.int64)
  slices = []
  for s in range(num_slices):
    lo, hi = counts * s // num_slices, counts * (s + 1) // num_slices
    sizes = hi - lo
    owner = np.repeat(np.arange(len(cells)), sizes)
    position = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes) + lo[owner]
    slices.append(np.sort(first[owner] + (position + shift[owner]) % counts[owner]))
  return slices


class ReadStats:
  """Edges and bytes this process read from bucket files for training
  (through ``read_rows`` / ``count``), for tests and benchmarks."""

  def __init__(self):
    self._lock = threading.Lock()
    self.edges = 0  # rows read
    self.bytes = 0  # bytes of those rows in the files
    self.kept = 0  # rows read that this process's devices train

  def keep(self, edges: int) -> None:
    with self._lock:
      self.kept += int(edges)

  def add(self, edges: int, num_bytes: int) -> None:
    with self._lock:
      self.edges += int(edges)
      self.bytes += int(num_bytes)

  def count(self, edges: dict, num_rows: int) -> None:
    """A read of ``num_rows`` rows of every column of ``edges`` (bytes: of
    the columns stored in files, np.memmap)."""
    self.add(num_rows, num_rows * sum(v.dtype.itemsize for v in edges.values()
                                      if isinstance(v, np.memmap)))

  def reset(self) -> None:
    with self._lock:
      self.edges = self.bytes = self.kept = 0


READ_STATS = ReadStats()
