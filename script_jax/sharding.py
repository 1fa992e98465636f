"""Device meshes for pretraining and fine-tuning, on one slice or across several.

Within one slice (every device on CPU and GPU, one TPU pod slice) `jax.make_mesh` lays the
axes out over the chip interconnect (ICI). A multi-slice TPU job (several slices joined by the
data-centre network, DCN; each device reports its `slice_index`) is not one torus, and
`jax.make_mesh` refuses it. There the 'data' axis spans the slices: each slice holds a
contiguous block of the data axis and its whole model axis, so the only traffic over DCN is the
data-parallel gradient all-reduce, as MaxText lays out its DCN data parallelism
(`mesh_utils.create_hybrid_device_mesh`).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
from jax.experimental import mesh_utils
import numpy as np


def num_slices(devices: Sequence[Any]) -> int:
  """How many slices the devices come from (1 where devices report no slice_index)."""
  return len({getattr(d, "slice_index", 0) for d in devices})


def device_grid(shape: Sequence[int], devices: Sequence[Any]) -> np.ndarray:
  """The devices arranged as `shape` (the first axis is 'data', or FSDP's 'replica'): within
  a slice by mesh_utils.create_device_mesh, across slices with the first axis split over the
  slices."""
  slices = num_slices(devices)
  if slices == 1:
    return mesh_utils.create_device_mesh(tuple(shape), devices)
  data, *rest = shape
  if data % slices:
    raise ValueError(f"The mesh's first axis ({data}) must be a multiple of the number of "
                     f"slices ({slices}): each slice holds whole rows of the mesh.")
  return mesh_utils.create_hybrid_device_mesh((data // slices, *rest), (slices,) + (1,) * len(rest),
                                               devices)


def batch_spec(mesh: jax.sharding.Mesh) -> jax.sharding.PartitionSpec:
  """How a batch is split over `mesh`: over every data-parallel axis ('replica' and 'data')."""
  if "replica" in mesh.axis_names:
    return jax.sharding.PartitionSpec(("replica", "data"))
  return jax.sharding.PartitionSpec("data")


def make_mesh(shape: Sequence[int], names: Sequence[str],
              devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
  """A mesh of Auto axes (XLA propagates the shardings; make_mesh defaults to Explicit in new
  JAX) over `devices` (default: all), across slices where there are several."""
  devices = jax.devices() if devices is None else list(devices)
  axis_types = (jax.sharding.AxisType.Auto,) * len(shape)
  if num_slices(devices) == 1:
    return jax.make_mesh(tuple(shape), tuple(names), devices=devices, axis_types=axis_types)
  return jax.sharding.Mesh(device_grid(shape, devices), tuple(names), axis_types=axis_types)


def fsdp_replicas(config, num_slices: int = 1) -> int:
  """How many groups each hold a whole copy of the state: 1 without FSDP (every device holds
  it; the mesh has no 'replica' axis), with it mesh.fsdp_replicas, or one per slice when 0."""
  if not config.mesh.get("fsdp", False):
    return 1
  return config.mesh.get("fsdp_replicas", 0) or num_slices


def mesh_shape(config, num_devices: int, num_slices: int = 1) -> tuple[int, int, int]:
  """(replicas, data, model): the mesh's axis sizes for `num_devices` devices (replicas is 1
  unless FSDP keeps several copies, `fsdp_replicas`; data -1 takes the devices left)."""
  replicas = max(1, fsdp_replicas(config, num_slices))
  model = config.mesh.model
  data = config.mesh.data if config.mesh.data > 0 else num_devices // max(model * replicas, 1)
  return replicas, data, model


def create_mesh(config, devices=None) -> jax.sharding.Mesh:
  """The ('data', 'model') mesh; data-parallel over every device by default, across slices on
  a multi-slice TPU job (`device_grid`). With FSDP over several groups (`fsdp_replicas`:
  one per slice unless set), ('replica', 'data', 'model'): the state is split within a group
  and each group holds a whole copy, so FSDP's gathers stay on a slice's interconnect."""
  devices = jax.devices() if devices is None else devices
  replicas, data_axis, model_axis = mesh_shape(config, len(devices), num_slices(devices))
  if replicas == 1:
    return make_mesh((data_axis, model_axis), ("data", "model"), devices)
  return make_mesh((replicas, data_axis, model_axis), ("replica", "data", "model"), devices)
