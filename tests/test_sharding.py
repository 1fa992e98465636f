"""Meshes across slices: the data axis is split over the slices, each row within one slice."""

import dataclasses
import random

import jax
import numpy as np
import pytest

from helpers import load_config

from script_jax import sharding as sharding_lib


@dataclasses.dataclass(frozen=True)
class FakeDevice:
  """What mesh_utils reads of a device: an id, a slice, a platform and a kind."""
  id: int
  slice_index: int
  process_index: int = 0
  platform: str = "cpu"
  device_kind: str = "cpu"


def _devices(slices, per_slice, shuffle=False):
  devices = [FakeDevice(s * per_slice + i, s, process_index=s) for s in range(slices)
             for i in range(per_slice)]
  if shuffle:
    random.Random(0).shuffle(devices)
  return devices


@pytest.mark.parametrize("slices,per_slice,model", [(2, 4, 1), (2, 4, 2), (4, 2, 1), (3, 4, 2)])
def test_each_slice_holds_whole_rows_of_the_data_axis(slices, per_slice, model):
  devices = _devices(slices, per_slice, shuffle=True)
  data = slices * per_slice // model
  grid = sharding_lib.device_grid((data, model), devices)
  assert grid.shape == (data, model)
  assert sorted(d.id for d in grid.flat) == list(range(slices * per_slice))  # each device once
  slice_of_row = [{d.slice_index for d in row} for row in grid]
  assert all(len(s) == 1 for s in slice_of_row)  # a row (its model axis) never crosses DCN
  # The rows of a slice are contiguous, in slice order: the data axis is [slice, within slice].
  assert [s.pop() for s in slice_of_row] == [r // (data // slices) for r in range(data)]


def test_a_data_axis_that_does_not_divide_into_slices_is_refused():
  with pytest.raises(ValueError, match="multiple of the number of slices"):
    sharding_lib.device_grid((3, 2), _devices(2, 3))


def test_one_slice_is_jax_make_mesh():
  assert sharding_lib.num_slices(jax.devices()) == 1
  mesh = sharding_lib.make_mesh((4, 2), ("data", "model"))
  want = jax.make_mesh((4, 2), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  assert mesh == want and mesh.axis_types == want.axis_types
  assert np.array_equal(sharding_lib.device_grid((8,), _devices(1, 8)),
                        np.array(_devices(1, 8), dtype=object))


@pytest.mark.parametrize("slices,per_slice", [(2, 4), (4, 2)])
def test_fsdp_on_several_slices_keeps_each_copy_of_the_state_in_one_slice(slices, per_slice):
  """mesh.fsdp on a multi-slice job: a 'replica' axis of one group per slice, the state split
  over 'data' within it (so FSDP's gathers never cross DCN), the batch over both."""
  devices = _devices(slices, per_slice, shuffle=True)
  mesh = sharding_lib.create_mesh(load_config("tiny", **{"mesh.fsdp": True}), devices=devices)
  assert mesh.axis_names == ("replica", "data", "model")
  assert mesh.devices.shape == (slices, per_slice, 1)
  assert [{d.slice_index for d in group.flat} for group in mesh.devices] == [
      {s} for s in range(slices)]
  assert sharding_lib.batch_spec(mesh) == jax.sharding.PartitionSpec(("replica", "data"))
  # Without FSDP the data axis spans the slices, as before.
  plain = sharding_lib.create_mesh(load_config("tiny"), devices=devices)
  assert plain.axis_names == ("data", "model") and plain.devices.shape == (slices * per_slice, 1)
