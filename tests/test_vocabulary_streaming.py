"""Streaming reads of the on-disk vocabulary: id ranges, chunks, the merge
join behind warm start and run diffs, and the lazy name sequence."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from twhin_jax import vocabulary


@pytest.fixture
def small_groups(monkeypatch):
  """Row groups of 4 names, so that a few dozen names span many groups."""
  monkeypatch.setattr(vocabulary, "ROW_GROUP_ROWS", 4)


def _names(count: int, seed: int, prefix: str = "n") -> list[str]:
  """Distinct names (some non-ASCII, whose UTF-8 order matters) in a seeded order."""
  names = [f"{prefix}{i:03d}" + ("é" if i % 7 == 0 else "") for i in range(count)]
  order = np.random.default_rng(seed).permutation(count)
  return [names[i] for i in order]


def test_ranges_and_chunks_cover_the_vocabulary_in_id_order(tmp_path, small_groups):
  names = _names(37, seed=0)
  vocabulary.write_vocabulary(str(tmp_path), "user", names)
  vocab = vocabulary.Vocabulary(str(tmp_path), "user")
  assert vocab._by_id.metadata.num_row_groups == 10
  for start, stop in ((0, 37), (3, 9), (4, 8), (35, 99), (-5, 2), (20, 20), (40, 50)):
    assert vocab.names_range(start, stop).to_pylist() == names[max(start, 0):stop]
  for chunk_rows in (1, 3, 4, 10, 100):
    chunks = [c.to_pylist() for c in vocab.iter_name_chunks(chunk_rows)]
    assert all(len(c) == chunk_rows for c in chunks[:-1])
    assert sum(chunks, []) == names
  with pytest.raises(ValueError, match="chunk_rows"):
    next(vocab.iter_name_chunks(0))
  by_name = [(n, i) for chunk_names, chunk_ids in vocab.iter_by_name()
             for n, i in zip(chunk_names.to_pylist(), chunk_ids.tolist())]
  assert by_name == sorted((n, i) for i, n in enumerate(names))


def test_id_map_joins_two_vocabularies_by_name(tmp_path, small_groups):
  old = _names(50, seed=1)
  # The new version drops 10 old names, keeps 40 in another order, adds 15.
  new = _names(15, seed=3, prefix="new") + old[10:]
  new = [new[i] for i in np.random.default_rng(2).permutation(len(new))]
  vocabulary.write_vocabulary(str(tmp_path / "old"), "user", old)
  vocabulary.write_vocabulary(str(tmp_path / "new"), "user", new)
  old_vocab = vocabulary.Vocabulary(str(tmp_path / "old"), "user")
  new_vocab = vocabulary.Vocabulary(str(tmp_path / "new"), "user")
  index = {n: i for i, n in enumerate(old)}
  expected = np.array([index.get(n, -1) for n in new], np.int64)
  np.testing.assert_array_equal(vocabulary.id_map(new_vocab, old_vocab), expected)
  out = np.full(len(new), 99, np.int64)  # filled in place, stale values cleared
  assert vocabulary.id_map(new_vocab, old_vocab, out=out) is out
  np.testing.assert_array_equal(out, expected)
  with pytest.raises(ValueError, match="shape"):
    vocabulary.id_map(new_vocab, old_vocab, out=np.zeros(3, np.int64))
  pairs = np.concatenate([np.stack(p, axis=1) for p in
                          vocabulary.iter_shared_ids(new_vocab, old_vocab)])
  assert len(pairs) == 40 and len(set(pairs[:, 0].tolist())) == 40
  for new_id, old_id in pairs.tolist():
    assert new[new_id] == old[old_id]


def test_name_sequence_reads_on_demand(tmp_path, small_groups):
  names = _names(23, seed=4)
  vocabulary.write_vocabulary(str(tmp_path), "item", names)
  sequence = vocabulary.NameSequence(vocabulary.Vocabulary(str(tmp_path), "item"))
  assert len(sequence) == 23 and bool(sequence)
  assert sequence[0] == names[0] and sequence[-1] == names[-1] and sequence[9] == names[9]
  assert sequence[5:13] == names[5:13] and sequence[::5] == names[::5]
  assert list(sequence) == names
  assert sequence.take([22, 0, 22]) == [names[22], names[0], names[22]]
  with pytest.raises(IndexError, match="item id 23"):
    sequence[23]
  results = []  # concurrent readers (the server's threads) share one reader
  threads = [threading.Thread(target=lambda: results.append(list(sequence))) for _ in range(4)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert results == [names] * 4


@pytest.mark.parametrize("batch", [1, 5, 200])  # bisect below BISECT_BELOW keys, hashing above
def test_lookups_by_bisect_and_by_hash_agree(tmp_path, small_groups, monkeypatch, batch):
  monkeypatch.setattr(vocabulary, "BISECT_BELOW", 8)
  names = _names(300, seed=5) + ["", "zz\u00e9", "a\U0001F600"]  # empty, non-ASCII, astral
  vocabulary.write_vocabulary(str(tmp_path), "user", names)
  vocab = vocabulary.Vocabulary(str(tmp_path), "user")
  rng = np.random.default_rng(batch)
  ids = rng.integers(0, len(names), batch)
  keys = [names[i] for i in ids]
  np.testing.assert_array_equal(vocab.ids(keys), ids)
  unknown = ["n000", "zzz", "a", "n0005", "\U0001F600"][:batch]  # between and beyond names
  np.testing.assert_array_equal(vocab.ids(unknown, missing=-1), -1)
  with pytest.raises(KeyError, match="unknown user"):
    vocab.ids(keys[:-1] + [unknown[0]])


def test_the_join_reads_each_row_group_of_the_other_side_about_once(tmp_path, small_groups):
  """A merge join, not a lookup per name: reading ``right``'s row groups in
  name order, each about once (a hash join per left group would read all of
  them per group)."""
  names = _names(400, seed=6)
  vocabulary.write_vocabulary(str(tmp_path / "a"), "user", names)
  vocabulary.write_vocabulary(str(tmp_path / "b"), "user", names[::-1])
  left = vocabulary.Vocabulary(str(tmp_path / "a"), "user")
  right = vocabulary.Vocabulary(str(tmp_path / "b"), "user")
  reads = []

  class Counting:
    def __init__(self, parquet):
      self.parquet, self.metadata = parquet, parquet.metadata

    def read_row_group(self, group, **kwargs):
      reads.append(group)
      return self.parquet.read_row_group(group, **kwargs)
  right._by_name = Counting(right._by_name)
  mapping = vocabulary.id_map(left, right)
  np.testing.assert_array_equal(mapping, np.arange(400)[::-1])
  groups = right._by_name.metadata.num_row_groups
  assert groups == 100 and sorted(set(reads)) == list(range(groups))
  assert len(reads) <= groups + 5, len(reads)
