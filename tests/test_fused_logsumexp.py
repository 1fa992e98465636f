"""The fused critic logsumexp (Pallas kernels, interpret mode on the CPU) against the plain formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from helpers import load_config, random_batch
from script_jax import fused_logsumexp
from script_jax import models
from script_jax import objectives


def _plain(features, table, bias):
  return jax.nn.logsumexp(models.tied_logits(features, table, bias), axis=-1)


def _inputs(b, t, e, v, vocab_size, dtype, seed=0):
  rng = np.random.default_rng(seed)
  features = jnp.asarray(rng.normal(size=(b, t, e)), dtype)
  table = jnp.asarray(rng.normal(size=(v, e)) * 0.3, jnp.float32)
  raw_bias = jnp.asarray(rng.normal(size=(v,)), jnp.float32)
  cot = jnp.asarray(rng.normal(size=(b, t)), jnp.float32)
  return features, table, raw_bias, cot


def _value_and_grads(lse_fn, features, table, raw_bias, cot, vocab_size):
  """sum(lse * cot) and its gradients w.r.t. features, table and the raw (unmasked) bias, whose
  padding columns go through models.mask_vocab_padding as in the model."""
  def loss(f, w, b):
    return (lse_fn(f, w, models.mask_vocab_padding(b, vocab_size)) * cot).sum()
  return jax.value_and_grad(loss, argnums=(0, 1, 2))(features, table, raw_bias)


# (B, T, E, V padded, vocab_size, block_rows, block_vocab): T and V not multiples of the blocks,
# several row and vocabulary blocks, and the model's padding of the vocabulary (300 -> 384 rows
# with 300 real ones, as 30522 -> 30592).
SIZES = [(3, 11, 16, 384, 300, 16, 128),  # 33 rows in 3 blocks of 16, 3 vocabulary blocks
         (2, 7, 24, 200, 200, 8, 128),    # V = 200 not a multiple of 128: padded to 256
         (1, 5, 8, 130, 129, 2048, 256)]  # one block each way, one padded vocabulary column


@pytest.mark.parametrize("dtype,rtol", [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("sizes", SIZES)
def test_pallas_logsumexp_equals_the_plain_formula(dtype, rtol, sizes):
  b, t, e, v, vocab_size, block_rows, block_vocab = sizes
  features, table, raw_bias, cot = _inputs(b, t, e, v, vocab_size, dtype)
  fused = lambda f, w, bias: fused_logsumexp.pallas_logsumexp(f, w, bias, block_rows,
                                                              block_vocab)
  want, want_grads = _value_and_grads(_plain, features, table, raw_bias, cot, vocab_size)
  got, got_grads = _value_and_grads(fused, features, table, raw_bias, cot, vocab_size)
  np.testing.assert_allclose(got, want, rtol=1e-5 if dtype == jnp.float32 else 1e-3)
  lse = fused(features, table, models.mask_vocab_padding(raw_bias, vocab_size))
  assert lse.dtype == jnp.float32 and lse.shape == (b, t)
  np.testing.assert_allclose(lse, _plain(features, table,
                                         models.mask_vocab_padding(raw_bias, vocab_size)),
                             rtol=1e-6, atol=1e-5)
  for name, g, w in zip(("features", "table", "bias"), got_grads, want_grads):
    assert g.dtype == w.dtype, name
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * np.abs(w).max(), err_msg=name)
  # The padding columns take no part: no gradient to their table rows or their bias.
  d_table, d_bias = np.asarray(got_grads[1]), np.asarray(got_grads[2])
  assert not d_table[vocab_size:].any() and not d_bias[vocab_size:].any()
  assert np.abs(d_table[:vocab_size]).sum(-1).min() > 0 and np.abs(d_bias[:vocab_size]).min() > 0


def test_pallas_logsumexp_under_a_sharded_jit_equals_the_plain_formula():
  """Each device's rows on 8 CPU devices (shard_map over the batch axes of an FSDP-style
  ('replica', 'data') mesh): the same values and gradients, the table's and bias's gradients
  summed over the batch."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("replica", "data"))
  rows = NamedSharding(mesh, P(("replica", "data")))
  whole = NamedSharding(mesh, P())
  features, table, raw_bias, cot = _inputs(8, 5, 16, 256, 250, jnp.float32, seed=1)
  features, cot = jax.device_put(features, rows), jax.device_put(cot, rows)

  def step(lse_fn):
    return jax.jit(lambda f, w, b, c: _value_and_grads(lse_fn, f, w, b, c, 250),
                   in_shardings=(rows, whole, whole, rows),
                   out_shardings=(whole, (rows, whole, whole)))

  fused = lambda f, w, b: fused_logsumexp.pallas_logsumexp(f, w, b, 8, 128, mesh=mesh)
  got, got_grads = step(fused)(features, table, raw_bias, cot)
  want, want_grads = step(_plain)(features, table, raw_bias, cot)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6)
  # Each device ran the kernel on its own row: nothing gathered the features.
  hlo = step(fused).lower(features, table, raw_bias, cot).compile().as_text()
  assert "all-gather" not in hlo


def test_critic_logsumexp_dispatches_on_impl():
  features, table, raw_bias, _ = _inputs(2, 3, 8, 128, 128, jnp.float32, seed=2)
  np.testing.assert_allclose(objectives.critic_logsumexp(features, table, raw_bias, impl="pallas"),
                             objectives.critic_logsumexp(features, table, raw_bias), rtol=1e-6)
  with pytest.raises(ValueError, match="plain, pallas"):
    objectives.critic_logsumexp(features, table, raw_bias, impl="fused")


@pytest.mark.slow
def test_script_objective_with_the_kernel_equals_the_plain_one():
  small_vocab = {"model.vocab_size": 500}  # 4 vocabulary blocks: seconds in interpret mode
  config = load_config("tiny", **small_vocab)
  pallas = load_config("tiny", **small_vocab, **{"script.logsumexp_impl": "pallas"})
  batch = random_batch(config, 4, seed=3)
  model = models.build_model(config)
  params = model.init(jax.random.key(0), batch["input_ids"], batch["segment_ids"],
                      batch["input_mask"], batch["masked_positions"])["params"]
  rng = jax.random.key(5)

  def value_and_grad(c):
    loss = lambda p: objectives.script_objective(p, batch, rng, model=model, config=c)[0]
    return jax.jit(jax.value_and_grad(loss))(params)

  (want, want_grads), (got, got_grads) = value_and_grad(config), value_and_grad(pallas)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=1e-6)


@pytest.mark.slow
def test_fsdp_train_step_with_the_kernel_equals_the_plain_one():
  """mesh.fsdp over two groups of 4 (the batch split over ('replica', 'data'), the table whole
  where the step uses it): the trainer's step with the kernels, the plain formula's loss and
  gradient norm."""
  from script_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from script_jax import state as state_lib  # pylint: disable=g-import-not-at-top
  from script_jax import train  # pylint: disable=g-import-not-at-top
  fsdp = {"mesh.fsdp": True, "mesh.fsdp_replicas": 2, "model.vocab_size": 500}
  metrics = {}
  for impl in ("plain", "pallas"):
    config = load_config("tiny", rng_impl="threefry2x32", **fsdp,
                         **{"script.logsumexp_impl": impl})
    mesh = sharding_lib.create_mesh(config)
    assert mesh.axis_names == ("replica", "data", "model")
    model = models.build_model(config)
    state, state_sharding = state_lib.init_state(config, model, mesh)
    batch = train.to_global_batch(random_batch(config, config.batch_size, seed=1), mesh)
    _, metrics[impl] = train.make_train_step(config, model, state_sharding, mesh)(state, batch)
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose(metrics["pallas"][key], metrics["plain"][key], rtol=1e-5)


def _v3_8_devices():
  """The 8 devices of a v3-8 as libtpu describes them, without a TPU (compiling only)."""
  import glob  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  if not glob.glob("/dev/accel*") and not os.path.exists("/dev/vfio"):
    for name, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                        ("TPU_ACCELERATOR_TYPE", "v3-8")):
      os.environ.setdefault(name, value)
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  return list(topologies.get_topology_desc(platform="tpu", topology_name="v3:2x2").devices)


def _v3_8_train_step_hlo(devices, **overrides):
  """The compiled TPU program of tiny's SCRIPT train step (bfloat16) for a v3-8."""
  import functools  # pylint: disable=g-import-not-at-top
  from script_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from script_jax import state as state_lib  # pylint: disable=g-import-not-at-top
  from script_jax import train  # pylint: disable=g-import-not-at-top
  config = load_config("tiny", rng_impl="threefry2x32", **{"model.dtype": "bfloat16"},
                       **overrides)
  mesh = sharding_lib.create_mesh(config, devices)
  model = models.build_model(config)
  abstract_state = jax.eval_shape(functools.partial(state_lib.create_train_state, config, model),
                                  jax.random.key(config.seed))
  state_sharding = sharding_lib.state_shardings(config, abstract_state, mesh)
  rows = NamedSharding(mesh, sharding_lib.batch_spec(mesh))
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       abstract_state, state_sharding)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=rows)
           for k, v in state_lib.dummy_batch(config, config.batch_size).items()}
  step = train.make_train_step(config, model, state_sharding, mesh)
  return step.trace(state, batch).lower().compile().as_text()


def _all_reduces(hlo):
  """Each all-reduce's result arrays, layouts dropped: [["f32[512,64]", ...], ...]."""
  import re  # pylint: disable=g-import-not-at-top
  return [re.findall(r"\b[a-z]+\d*\[[\d,]*\]", result)
          for result in re.findall(r"= (.*?) all-reduce(?:-start)?\(", hlo)]


@pytest.mark.slow
def test_the_script_train_step_with_the_kernels_compiles_for_a_v3_8():
  """tiny's SCRIPT train step, logsumexp_impl=pallas, compiled ahead of time by libtpu (Mosaic
  for the kernels): the kernels run on each device's rows (no all-gather), their d_table and
  d_bias are summed in float32, and the program has the plain formula's all-reduces, no other
  collective."""
  devices = _v3_8_devices()
  hlo = _v3_8_train_step_hlo(devices, **{"script.logsumexp_impl": "pallas"})
  assert hlo.count('custom_call_target="tpu_custom_call"') >= 2  # forward and backward kernels
  assert "CustomSPMDPartitioning" not in hlo
  for kind in ("all-gather", "all-to-all", "reduce-scatter", "collective-permute"):
    assert kind not in hlo, kind
  all_reduces = _all_reduces(hlo)
  table, bias = "[512,64]", "[512]"  # tiny's vocabulary x embedding
  summed = [a for result in all_reduces for a in result if a.endswith((table, bias))]
  assert summed and all(a.startswith("f32[") for a in summed), all_reduces
  assert all_reduces == _all_reduces(_v3_8_train_step_hlo(devices))
