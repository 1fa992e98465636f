"""mesh.fsdp: parameters and optimizer state split over 'data' (sharding.state_shardings).

On the 8 fake CPU devices: the layout of each array, the train step equal to the replicated one (2 steps),
the compiled step's collectives, and a checkpoint restored into the FSDP layout.
"""

import jax
import numpy as np
import pytest
from helpers import load_config, random_batch, run_steps
from script_jax.bench import hlo_collectives

from script_jax import checkpoints
from script_jax import models
from script_jax import sharding as sharding_lib
from script_jax import state as state_lib
from script_jax import train
from script_jax.data import synthetic

P = jax.sharding.PartitionSpec


def _config(objective="script", **overrides):
  return load_config("tiny", objective=objective, batch_size=16,
                     **{"model.num_layers": 2, "electra.generator_num_layers": 2,
                        "optim.warmup_steps": 1, **overrides})


@pytest.mark.parametrize("shape,stacked,spec", [
    ((), False, P()),  # the step counter
    ((7,), False, P()),  # no dimension the 8 devices divide
    ((4,), False, P()),  # smaller than the axis
    ((64,), False, P("data")),
    ((512, 64), False, P("data", None)),  # the major-most divisible dimension
    ((64, 256), False, P("data", None)),  # not the largest: split along a minor dimension, the
    ((4, 64, 256), False, P(None, "data", None)),  # TPU's reduce-scatter is a whole all-reduce
    ((6, 256), False, P(None, "data")),
    ((2, 64, 129), True, P(None, "data", None)),  # scanned layers: 2 is not divided, 129 not by 8
    ((8, 16, 32), True, P(None, "data", None)),  # the layer axis is never split
    ((8, 7), True, P()),
])
def test_fsdp_spec_splits_the_major_most_divisible_dimension(shape, stacked, spec):
  assert sharding_lib.fsdp_spec(shape, 8, stacked=stacked) == spec
  assert sharding_lib.fsdp_spec(shape, 1, stacked=stacked) == P()


def test_fsdp_state_never_splits_a_scanned_stack_along_its_layers():
  """state_shardings reads the layer stacks from the tree paths, in the parameters and in each
  optimizer moment: 8 layers over 8 devices stay whole per layer, split inside each layer."""
  mesh = sharding_lib.make_mesh((8, 1), ("data", "model"), jax.devices())
  config = _config(**{"mesh.fsdp": True})
  stacked = {"layers": {"layer": {"kernel": jax.ShapeDtypeStruct((8, 16, 32), np.float32)}},
             "table": jax.ShapeDtypeStruct((8, 16), np.float32)}
  state = {"params": stacked, "mu": stacked}
  specs = jax.tree.map(lambda s: s.spec, sharding_lib.state_shardings(config, state, mesh))
  for part in ("params", "mu"):
    assert specs[part]["layers"]["layer"]["kernel"] == P(None, "data", None)
    assert specs[part]["table"] == P("data", None)


# SCRIPT's step has both passes, ELECTRA's a second model (scanned: two scans, the generator's
# narrower, each gathering its own layers); MLM's parameters are SCRIPT's. SCRIPT's runs with
# two FSDP groups of 4 (mesh.fsdp_replicas, what one group per slice gives on two slices).
@pytest.mark.slow
@pytest.mark.parametrize("objective,scan_layers,replicas", [("script", False, 2),
                                                            ("electra", True, 0)])
def test_fsdp_steps_equal_the_replicated_steps(objective, scan_layers, replicas):
  devices = jax.devices()
  assert len(devices) == 8
  layout = {"model.scan_layers": scan_layers}
  batches = [random_batch(_config(objective), 16, seed=10 + s) for s in range(2)]
  replicated_params, replicated_losses = run_steps(_config(objective, **layout), devices,
                                                   batches)
  fsdp = _config(objective, **layout, **{"mesh.fsdp": True, "mesh.fsdp_replicas": replicas})
  fsdp_params, fsdp_losses = run_steps(fsdp, devices, batches)
  np.testing.assert_allclose(fsdp_losses, replicated_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               fsdp_params, replicated_params)


def _fsdp_state(config):
  mesh = sharding_lib.create_mesh(config)
  model = models.build_model(config)
  state, sharding = state_lib.init_state(config, model, mesh)
  return mesh, model, state, sharding


@pytest.mark.slow
@pytest.mark.parametrize("scan_layers,replicas", [(False, 0), (True, 2)])
def test_fsdp_compiled_step_gathers_only_parameters(scan_layers, replicas):
  """All-gathers bring whole weights to the step, never the batch's activations, and scanned
  layers one at a time inside the scan (a [1, ...] slice of a stacked weight, never all L);
  gradients and metrics are summed with all-reduces (on TPU and GPU, XLA rewrites an
  all-reduce whose result is then sliced into a reduce-scatter; its CPU pipeline does not);
  nothing else moves. With two FSDP groups of 4, every gather stays within a group and the
  gradient's sum crosses them (on a multi-slice job: the only traffic over DCN)."""
  config = _config(**{"mesh.fsdp": True, "mesh.fsdp_replicas": replicas,
                      "model.scan_layers": scan_layers, "model.remat": scan_layers})
  mesh, model, state, sharding = _fsdp_state(config)
  data_size = 8 // max(replicas, 1)
  assert mesh.shape["data"] == data_size
  sharded = [x for x in jax.tree.leaves(state.params) if x.sharding.spec != P()]
  assert len(sharded) > 0.8 * len(jax.tree.leaves(state.params))
  assert all(x.sharding.spec == s.spec for x, s in zip(jax.tree.leaves(state),
                                                       jax.tree.leaves(sharding)))
  per_device = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state))
  assert per_device < 2.4 / data_size * sum(x.nbytes for x in jax.tree.leaves(state))
  step = train.make_train_step(config, model, sharding, mesh)
  batch = train.to_global_batch(synthetic.random_masked_batch(config, 16, 0), mesh)
  collectives = hlo_collectives.collectives(step.lower(state, batch).compile().as_text())
  assert {c.kind for c in collectives} <= {"all-gather", "all-reduce", "reduce-scatter"}
  layers = state.params["encoder"].get("layers", {})
  one_layer_shapes = {(1,) + x.shape[1:] for x in jax.tree.leaves(layers)}
  whole_shapes = {tuple(x.shape) for x in jax.tree.leaves(
      {k: v for k, v in state.params.items() if k != "encoder"})}
  whole_shapes |= {tuple(x.shape) for x in jax.tree.leaves(
      {k: v for k, v in state.params["encoder"].items() if k != "layers"})}
  gathers = [c for c in collectives if c.kind == "all-gather"]
  gathered = [shape for c in gathers for shape in c.shapes()]
  assert gathered
  for dims in gathered:
    assert dims in whole_shapes | one_layer_shapes, dims
  if scan_layers:  # the largest weight, one layer of it at a time
    assert (1,) + layers["layer"]["intermediate"]["kernel"].shape[1:] in gathered
  if replicas > 1:
    position = {d: i for i, d in enumerate(mesh.devices.flat)}
    group_of = {position[d]: r for r, group in enumerate(mesh.devices) for d in group.flat}
    assert all(c.groups for c in gathers)
    for c in gathers:
      for devices in c.groups:
        assert len({group_of[d] for d in devices}) == 1, (c.result, devices)
    assert any(c.groups == () or any(len({group_of[d] for d in g}) == replicas
                                     for g in c.groups)
               for c in collectives if c.kind == "all-reduce")


@pytest.mark.slow
def test_fsdp_checkpoint_restores_into_its_layout(tmp_path):
  config = _config(**{"mesh.fsdp": True})
  _, _, state, _ = _fsdp_state(config)
  manager = checkpoints.make_manager(str(tmp_path), config)
  manager.save(1, args=checkpoints.ocp.args.StandardSave(state))
  manager.wait_until_finished()
  restored = checkpoints.restore_state(manager, 1, state_lib.abstract_like(state))
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    assert b.sharding == a.sharding
    np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
  manager.close()


# The table's rows split (V divisible by the data axis), its columns split (V is not), or
# neither; over one FSDP group of 8 or two groups of 4.
@pytest.mark.parametrize("shape,mesh_shape", [((48, 16), (1, 8)), ((48, 16), (2, 4)),
                                              ((44, 16), (2, 4)), ((44, 6), (1, 8))])
def test_sharded_lookup_equals_take_and_sends_its_gradient_to_the_shards(shape, mesh_shape):
  """sharding.ShardedLookup against jnp.take on fresh random inputs: the same rows, the same
  gradient (float32 sums of each token's cotangent, repeated ids included), laid out as the
  table is stored."""
  replicas, data = mesh_shape
  mesh = sharding_lib.make_mesh((replicas, data, 1), ("replica", "data", "model"),
                                jax.devices())
  if replicas == 1:
    mesh = sharding_lib.make_mesh((data, 1), ("data", "model"), jax.devices())
  spec = sharding_lib.fsdp_spec(shape, data)
  lookup = sharding_lib.ShardedLookup(mesh)
  assert lookup.table_spec(shape) == spec
  rng = np.random.default_rng(sum(shape) + replicas)
  table = rng.normal(size=shape).astype(np.float32)
  ids = rng.integers(0, shape[0], size=(16, 5)).astype(np.int32)
  ids[1, :] = ids[0, 0]  # one row looked up many times
  weights = rng.normal(size=(16, 5, shape[1])).astype(np.float32)
  batch_sharding = jax.sharding.NamedSharding(mesh, sharding_lib.batch_spec(mesh))
  whole = jax.sharding.NamedSharding(mesh, P())

  def loss(lookup_fn, t, i, w):
    return (lookup_fn(t, i) * w).sum()

  ours = jax.jit(jax.value_and_grad(lambda t, i, w: loss(lookup, t, i, w)))
  value, grad = ours(jax.device_put(table, whole), jax.device_put(ids, batch_sharding),
                     jax.device_put(weights, batch_sharding))
  expected_rows = table[ids]
  expected_grad = np.zeros(shape, np.float64)
  np.add.at(expected_grad, ids.reshape(-1), weights.reshape(-1, shape[1]).astype(np.float64))
  np.testing.assert_allclose(value, (expected_rows * weights).sum(), rtol=1e-5)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-5)
  assert grad.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, spec), 2)
  np.testing.assert_array_equal(jax.jit(lookup)(table, ids), expected_rows)


@pytest.mark.parametrize("mesh_shape", [(1, 8), (2, 4)])
def test_sharded_rows_for_every_sequence_equal_a_broadcast_take(mesh_shape):
  """ShardedLookup.for_every_sequence (the position embeddings under FSDP) against numpy: the
  rows of the first T positions for every sequence, and their gradient summed over the batch,
  laid out as the table is stored."""
  replicas, data = mesh_shape
  if replicas == 1:
    mesh = sharding_lib.make_mesh((data, 1), ("data", "model"), jax.devices())
  else:
    mesh = sharding_lib.make_mesh((replicas, data, 1), ("replica", "data", "model"),
                                  jax.devices())
  lookup = sharding_lib.ShardedLookup(mesh)
  rng = np.random.default_rng(int(np.random.default_rng().integers(1 << 30)))
  table = rng.normal(size=(24, 16)).astype(np.float32)  # 24 positions, 5 used
  weights = rng.normal(size=(16, 5, 16)).astype(np.float32)
  positions = np.arange(5, dtype=np.int32)
  batch_sharding = jax.sharding.NamedSharding(mesh, sharding_lib.batch_spec(mesh))
  value, grad = jax.jit(jax.value_and_grad(
      lambda t, w: (lookup.for_every_sequence(t, positions, 16) * w).sum()))(
          table, jax.device_put(weights, batch_sharding))
  expected_grad = np.zeros(table.shape, np.float64)
  expected_grad[:5] = weights.astype(np.float64).sum(0)
  np.testing.assert_allclose(value, (table[positions][None] * weights).sum(), rtol=1e-5)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-5)
  stored = jax.sharding.NamedSharding(mesh, lookup.table_spec(table.shape))
  assert grad.sharding.is_equivalent_to(stored, 2)
