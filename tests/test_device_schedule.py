"""The exact device schedule (twhin_jax/device_schedule.py): a round-robin
tournament of 2G slots. Checked exhaustively for G = 1 .. 16."""

from __future__ import annotations

import itertools

import pytest

from twhin_jax import device_schedule

DEVICE_COUNTS = list(range(1, 17))


@pytest.mark.parametrize("players", [2, 4, 6, 8, 16, 32])
def test_circle_method_meets_every_pair_once(players):
  rounds = device_schedule.circle_rounds(players)
  assert len(rounds) == players - 1
  met = []
  for pairs in rounds:
    assert len(pairs) == players // 2
    in_round = [p for pair in pairs for p in pair]
    assert sorted(in_round) == list(range(players))  # everyone plays once a round
    met.extend(frozenset(pair) for pair in pairs)
  assert len(met) == len(set(met)) == players * (players - 1) // 2


@pytest.mark.parametrize("bad", [0, 1, 3, 7])
def test_circle_method_needs_an_even_count(bad):
  with pytest.raises(ValueError, match="even"):
    device_schedule.circle_rounds(bad)


@pytest.mark.parametrize("devices", DEVICE_COUNTS)
def test_every_sub_bucket_is_trained_exactly_once(devices):
  schedule = device_schedule.tournament(devices)
  slots = 2 * devices
  assert schedule.num_rounds == 2 * devices - 1
  trained = [cell for per_device in schedule.cells for cells in per_device for cell in cells]
  assert len(trained) == len(set(trained))
  assert set(trained) == set(itertools.product(range(slots), repeat=2))
  owner = schedule.owner()
  assert len(owner) == slots * slots


@pytest.mark.parametrize("devices", DEVICE_COUNTS)
def test_devices_hold_disjoint_rows_in_every_round(devices):
  """Each round, the G devices hold the 2G slots once each, and a device only
  trains sub-buckets between the slots it holds: no two devices ever update
  one row in the same round."""
  schedule = device_schedule.tournament(devices)
  for r in range(schedule.num_rounds):
    held = [slot for pair in schedule.holds[r] for slot in pair]
    assert sorted(held) == list(range(2 * devices)), (r, schedule.holds[r])
    for g, cells in enumerate(schedule.cells[r]):
      mine = set(schedule.holds[r][g])
      for src, dst in cells:
        assert src in mine and dst in mine, (r, g, src, dst)


@pytest.mark.parametrize("devices", DEVICE_COUNTS)
def test_round_zero_is_home_and_moves_bring_every_slot_home(devices):
  """Round 0 is where loading puts the slots (device g: 2g, 2g + 1); applying
  the moves round after round visits each round's placement and ends at home."""
  schedule = device_schedule.tournament(devices)
  assert schedule.holds[0] == tuple((2 * g, 2 * g + 1) for g in range(devices))
  where = {place: slot for slot, place in schedule.place(0).items()}  # (device, pos) -> slot
  for r in range(schedule.num_rounds):
    assert {slot: place for place, slot in where.items()} == schedule.place(r)
    moved = dict(where)
    targets = set()
    for source, target in schedule.moves(r):
      assert target not in targets  # one slot per place
      targets.add(target)
      moved[target] = where[source]
    where = moved
    assert sorted(where.values()) == list(range(2 * devices))
  assert where == {place: slot for slot, place in schedule.place(0).items()}


@pytest.mark.parametrize("devices", [2, 3, 4, 8])
def test_permutation_pairs_are_valid_ppermutes(devices):
  """Every (source position, target position) group is a partial permutation
  of the devices (what jax.lax.ppermute accepts), and together they carry
  every move."""
  schedule = device_schedule.tournament(devices)
  for r in range(schedule.num_rounds):
    pairs = device_schedule.permutation_pairs(schedule, r)
    carried = 0
    for (p, q), perm in pairs.items():
      sources, targets = [a for a, _ in perm], [b for _, b in perm]
      assert len(set(sources)) == len(sources) and len(set(targets)) == len(targets)
      carried += len(perm)
    assert carried == len(schedule.moves(r))


def test_one_device_is_one_round_of_everything():
  schedule = device_schedule.tournament(1)
  assert schedule.holds == (((0, 1),),)
  assert set(schedule.cells[0][0]) == {(0, 0), (1, 1), (0, 1), (1, 0)}
  assert schedule.moves(0) == []


def test_config_names_the_schedules():
  from twhin_jax import config as config_lib
  from twhin_jax import demo_config
  config = demo_config.get_config("test")
  assert config.mesh.schedule == "ring"
  config.mesh.schedule = "tournament"
  config_lib.validate(config)
  config.mesh.schedule = "round_robin"
  with pytest.raises(ValueError, match="mesh.schedule"):
    config_lib.validate(config)
