"""Sharding, in one place: the mesh, where the state and the batch live on it, FSDP's gathers.

The trainer, the train state, evaluation, fine-tuning and the benchmarks ask this module for
their layout; the model only carries a slot for the per-layer gather
(`models.EncoderConfig.layer_params_at_use`), which `for_the_step` fills.

Mesh axes (`create_mesh`; their sizes from config.mesh by `mesh_shape`):
  'data'     data parallelism: the batch is split over it, and with mesh.fsdp the state too.
  'model'    size 1: no parameter is split over it (config_lib.validate_config refuses more).
  'replica'  only under FSDP over several groups (`fsdp_replicas`, one per slice by default):
             each group holds a whole split copy of the state.

Within one slice (every device on CPU and GPU, one TPU pod slice) `jax.make_mesh` lays the
axes out over the chip interconnect (ICI). A multi-slice TPU job (several slices joined by the
data-centre network, DCN; each device reports its `slice_index`) is not one torus, and
`jax.make_mesh` refuses it. There the first axis spans the slices (`device_grid`): each slice
holds a contiguous block of it and its whole model axis, so the only traffic over DCN is the
data-parallel gradient all-reduce, as MaxText lays out its DCN data parallelism
(`mesh_utils.create_hybrid_device_mesh`).

The batch (`batch_spec`) is split over every data-parallel axis: ('replica', 'data') or 'data'.

The state (`state_shardings`) is replicated on every device by default; with mesh.fsdp each
array of the parameters and optimizer moments is split over 'data' along its major-most divisible
dimension, never a scanned stack's layer axis (`fsdp_spec`).

The gathers (`for_the_step`): under FSDP the step uses the lookup tables whole
(`fsdp_use_shardings`) and each scanned layer whole, one at a time inside the scan
(`LayerGather`), by an all-gather whose gradient is reduce-scattered back into the stored split
(`_gathered`). Measured in docs/benchmarks.md.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import mesh_utils
import numpy as np

from script_jax import models

P = jax.sharding.PartitionSpec


# ----------------------------------------------------------------------------- the mesh

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
  if not config.mesh.fsdp:
    return 1
  return config.mesh.fsdp_replicas or num_slices


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


# ----------------------------------------------------------------------------- the batch

def batch_spec(mesh: jax.sharding.Mesh) -> jax.sharding.PartitionSpec:
  """How a batch is split over `mesh`: over every data-parallel axis ('replica' and 'data')."""
  if "replica" in mesh.axis_names:
    return jax.sharding.PartitionSpec(("replica", "data"))
  return jax.sharding.PartitionSpec("data")


# ----------------------------------------------------------------------------- FSDP's state

def fsdp_spec(shape: tuple[int, ...], data_size: int, stacked: bool = False) -> P:
  """FSDP's layout of one array: its major-most (first) dimension that the data axis divides is
  split over 'data'; an array with no such dimension (a scalar, an odd size) stays replicated.
  `stacked`: a scanned stack [L, ...], whose layer axis is never split (the scan gathers one
  layer at a time). Major-most, not the largest: the TPU compiler writes a gradient's
  reduce-scatter along a minor dimension as an all-reduce of the whole array (seen on a v5e-256
  for the [N, D, H] attention output kernel and the [P, E] position table, split along H and E:
  docs/benchmarks.md 7.3.3)."""
  first = 1 if stacked else 0
  dims = [i for i, d in enumerate(shape) if i >= first and d % data_size == 0 and d >= data_size]
  if data_size == 1 or not dims:
    return P()
  return P(*[("data" if i == dims[0] else None) for i in range(len(shape))])


def is_stacked(path) -> bool:
  """Whether a state leaf at this tree path is a scanned stack of layers [L, ...]
  (models.stack_layers: `layers/layer/...`, in the parameters and in each optimizer moment)."""
  keys = [str(getattr(k, "key", getattr(k, "name", ""))) for k in path]
  return any(a == "layers" and b == "layer" for a, b in zip(keys, keys[1:]))


def state_shardings(config, abstract_state, mesh):
  """Where each array of the state lives: replicated on every device (data parallelism, the
  default), or with mesh.fsdp its parameters and optimizer moments split over 'data'
  (`fsdp_spec`; XLA gathers each weight where the step uses it and reduce-scatters its
  gradient)."""
  if not config.mesh.fsdp:
    replicated = jax.sharding.NamedSharding(mesh, P())
    return jax.tree.map(lambda _: replicated, abstract_state)
  data_size = mesh.shape["data"]
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jax.sharding.NamedSharding(
          mesh, fsdp_spec(x.shape, data_size, stacked=is_stacked(path))), abstract_state)


def fsdp_use_shardings(params_sharding, mesh):
  """The layout each parameter takes where the step uses it, under mesh.fsdp: the lookup tables
  (`embedding` leaves: words, positions, segments) whole on every device, the rest as stored.
  A lookup into a table split over 'data' makes XLA all-gather every device's token ids
  instead, the batch crossing the pod; gathering the table once also serves the tied output
  layer. Unscanned weights XLA gathers where each is used; scanned layers are gathered one at a
  time inside the scan (`LayerGather`)."""
  replicated = jax.sharding.NamedSharding(mesh, P())

  def use(path, sharding):
    return replicated if str(getattr(path[-1], "key", "")) == "embedding" else sharding

  return jax.tree_util.tree_map_with_path(use, params_sharding)


# ----------------------------------------------------------------------------- FSDP's gathers

@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _gathered(x, stored, whole):
  """x (in its `stored` layout) made `whole`: an all-gather, whose gradient is split back into
  `stored`. (Constraining x to `stored` first as well made XLA split the layer's activations
  along the weights' split dimensions.)"""
  del stored
  return jax.lax.with_sharding_constraint(x, whole)


def _gathered_fwd(x, stored, whole):
  return _gathered(x, stored, whole), None


def _gathered_bwd(stored, whole, _, g):
  # The gradient goes straight back to the stored layout: each device's partial sum over its
  # batch is reduced into its own slice (a reduce-scatter), not summed whole on every device.
  del whole
  return (jax.lax.with_sharding_constraint(g, stored),)


_gathered.defvjp(_gathered_fwd, _gathered_bwd)


@dataclasses.dataclass(frozen=True)
class LayerGather:
  """FSDP for scanned layers: applied to one layer's parameters inside the scan
  (`with_layer_params_at_use`), it gathers that layer whole where it is used and sends its
  gradient back split. One layer's weights are whole at a time, not all L; remat gathers again
  in the backward pass. Left to XLA, the scan's weights stay split and it partitions the saved
  activations across the batch instead, all-gathering attention probabilities."""
  mesh: jax.sharding.Mesh
  num_layers: int

  def __call__(self, layer_params):
    data_size = self.mesh.shape["data"]
    whole = jax.sharding.NamedSharding(self.mesh, P())

    def gather(x):
      stacked_spec = tuple(fsdp_spec((self.num_layers,) + tuple(x.shape), data_size,
                                     stacked=True))
      stacked_spec += (None,) * (x.ndim + 1 - len(stacked_spec))
      stored = jax.sharding.NamedSharding(self.mesh, P(*stacked_spec[1:]))
      return _gathered(x, stored, whole)

    return jax.tree.map(gather, layer_params)


# ----------------------------------------------------------------------------- FSDP's lookup

@dataclasses.dataclass(frozen=True)
class ShardedLookup:
  """FSDP's lookups (words, positions, token types): rows of the whole table, whose gradient
  each device scatter-adds from its own tokens and sends straight into the table's shards, as
  FSDP stores it (`fsdp_spec`): a reduce-scatter over 'data' (and, with FSDP groups, a sum of
  the shard over 'replica'). Left to XLA, a lookup's scatter-add is all-reduced whole over
  every device and then sliced (seen on a v5e-256: f32[30592,1024] all-reduced over 256
  devices, docs/benchmarks.md 7.3.2)."""
  mesh: jax.sharding.Mesh

  def __call__(self, table_VxE: jax.Array, ids_BxT: jax.Array) -> jax.Array:
    return _sharded_lookup(self, table_VxE, ids_BxT)

  def for_every_sequence(self, table_PxE: jax.Array, positions_T: jax.Array,
                         batch_size: int) -> jax.Array:
    """table[positions] [T, E] for each of `batch_size` sequences, [B, T, E]: each device sums
    its sequences' gradient first, then it goes into the shards (no per-token lookup)."""
    return _sharded_for_every_sequence(self, batch_size, table_PxE, positions_T)

  def table_spec(self, shape: tuple[int, ...]) -> P:
    return fsdp_spec(shape, self.mesh.shape["data"])

  def reduced_into_shards(self, d_table_local: jax.Array) -> jax.Array:
    """Inside shard_map: this device's part of a table's gradient summed over every device,
    each keeping its own shard of the sum (a reduce-scatter over 'data', then a sum over
    'replica')."""
    spec = tuple(self.table_spec(d_table_local.shape))
    if "data" in spec:
      d_table_local = jax.lax.psum_scatter(d_table_local, "data",
                                           scatter_dimension=spec.index("data"), tiled=True)
    else:
      d_table_local = jax.lax.psum(d_table_local, "data")
    if "replica" in self.mesh.axis_names:
      d_table_local = jax.lax.psum(d_table_local, "replica")
    return d_table_local


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sharded_lookup(lookup: ShardedLookup, table_VxE, ids_BxT):
  del lookup
  return jnp.take(table_VxE, ids_BxT, axis=0)


def _sharded_lookup_fwd(lookup, table_VxE, ids_BxT):
  # The table's shape and dtype ride along as a zero-size array: residuals must be arrays.
  shape_of_table = jnp.zeros((0,) + table_VxE.shape, table_VxE.dtype)
  return _sharded_lookup(lookup, table_VxE, ids_BxT), (ids_BxT, shape_of_table)


def _sharded_lookup_bwd(lookup, residuals, g_BxTxE):
  ids_BxT, shape_of_table = residuals
  num_rows, width = shape_of_table.shape[1:]
  rows = batch_spec(lookup.mesh)

  def local(ids_bxT, g_bxTxE):
    d_table_VxE = jnp.zeros((num_rows, width), jnp.float32).at[ids_bxT.reshape(-1)].add(
        g_bxTxE.reshape(-1, width).astype(jnp.float32))
    return lookup.reduced_into_shards(d_table_VxE).astype(shape_of_table.dtype)

  d_table = jax.shard_map(local, mesh=lookup.mesh, in_specs=(rows, rows),
                          out_specs=lookup.table_spec((num_rows, width)),
                          check_vma=False)(ids_BxT, g_BxTxE)
  return d_table, None


_sharded_lookup.defvjp(_sharded_lookup_fwd, _sharded_lookup_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _sharded_for_every_sequence(lookup: ShardedLookup, batch_size: int, table_PxE, positions_T):
  del lookup
  rows_TxE = jnp.take(table_PxE, positions_T, axis=0)
  return jnp.broadcast_to(rows_TxE[None], (batch_size,) + rows_TxE.shape)


def _sharded_for_every_sequence_fwd(lookup, batch_size, table_PxE, positions_T):
  shape_of_table = jnp.zeros((0,) + table_PxE.shape, table_PxE.dtype)
  out = _sharded_for_every_sequence(lookup, batch_size, table_PxE, positions_T)
  return out, (positions_T, shape_of_table)


def _sharded_for_every_sequence_bwd(lookup, batch_size, residuals, g_BxTxE):
  del batch_size
  positions_T, shape_of_table = residuals
  num_rows, width = shape_of_table.shape[1:]

  def local(positions, g_bxTxE):
    d_table_PxE = jnp.zeros((num_rows, width), jnp.float32).at[positions].add(
        g_bxTxE.astype(jnp.float32).sum(0))
    return lookup.reduced_into_shards(d_table_PxE).astype(shape_of_table.dtype)

  d_table = jax.shard_map(local, mesh=lookup.mesh, in_specs=(P(), batch_spec(lookup.mesh)),
                          out_specs=lookup.table_spec((num_rows, width)),
                          check_vma=False)(positions_T, g_BxTxE)
  return d_table, None


_sharded_for_every_sequence.defvjp(_sharded_for_every_sequence_fwd,
                                   _sharded_for_every_sequence_bwd)


def _with_encoder_fields(model: nn.Module, fields_for) -> nn.Module:
  """`model` (MaskedLM or ElectraPretrainer) with each of its encoders' configs
  (models.EncoderConfig) given the fields `fields_for(cfg)` returns."""
  updates = {f.name: dataclasses.replace(getattr(model, f.name),
                                         **fields_for(getattr(model, f.name)))
             for f in dataclasses.fields(model)
             if isinstance(getattr(model, f.name, None), models.EncoderConfig)}
  return model.clone(**updates)


def for_the_step(config, model, params_sharding, mesh):
  """(model, params_at_use) for a step over `mesh`: kernels that run per device
  (model.attention_impl="pallas") are given the mesh; under mesh.fsdp the model gathers its
  scanned layers one at a time (`LayerGather`), looks its tables up with `ShardedLookup`, and
  `params_at_use` puts the rest in the layout the step uses them in (`fsdp_use_shardings`);
  otherwise `model` and the identity."""
  if config.model.attention_impl == "pallas":
    model = _with_encoder_fields(model, lambda cfg: {"kernel_sharding": (mesh, batch_spec(mesh))})
  if not config.mesh.fsdp:
    return model, lambda params: params
  def fields_for(cfg):
    fields = {"lookup": ShardedLookup(mesh)}
    if config.model.scan_layers:
      fields["layer_params_at_use"] = LayerGather(mesh, cfg.num_layers)
    return fields

  model = _with_encoder_fields(model, fields_for)
  use = fsdp_use_shardings(params_sharding, mesh)
  # Each gradient is constrained back to its stored split (`_gathered`): a lookup table used
  # whole would otherwise get its gradient summed whole on every device (an all-reduce of
  # [V, E]), not reduce-scattered into the shards.
  return model, lambda params: jax.tree.map(_gathered, params, params_sharding, use)
