"""The fused critic logsumexp (Pallas kernels, interpret mode on the CPU) against the plain formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from helpers import load_config, lowbias32_numpy, random_batch
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


# ----------------------------------------------------------------------------- the MLM head

def _gumbel_numpy(key1, key2, rows, vocab):
  """The head's noise [rows, vocab] in float64 from its definition: u from the top 24 bits of
  hash(hash(hash(row ^ key1) ^ column) ^ key2), G = -log(-log(u))."""
  k1, k2 = (np.uint32(np.int32(k).view(np.uint32)) for k in (key1, key2))
  row = np.arange(rows, dtype=np.uint32)[:, None]
  column = np.arange(vocab, dtype=np.uint32)[None, :]
  bits = lowbias32_numpy(lowbias32_numpy(lowbias32_numpy(row ^ k1) ^ column) ^ k2)
  uniform = ((bits >> np.uint32(8)).astype(np.float64) + 0.5) / 2 ** 24
  return -np.log(-np.log(uniform))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("sizes", SIZES[:2])
def test_pallas_mlm_head_equals_the_plain_head(dtype, sizes):
  """nll and its gradients against mlm_terms of tied_logits; argmax against first_argmax; the
  sample against numpy's argmax of logits / tau + the noise written from its definition, over
  the real vocabulary only (several row and vocabulary blocks, padded vocabulary)."""
  b, p, e, v, vocab_size, block_rows, block_vocab = sizes
  features, table, raw_bias, cot = _inputs(b, p, e, v, vocab_size, dtype, seed=4)
  labels = jnp.asarray(np.random.default_rng(4).integers(0, vocab_size, (b, p)), jnp.int32)
  keys = jnp.asarray([987654321, -13579], jnp.int32)
  tau = 0.7

  def head(f, w, bias):
    return fused_logsumexp.pallas_mlm_head(f, w, bias, labels, keys, tau, vocab_size, True,
                                           block_rows, block_vocab)
  plain_nll = lambda f, w, bias: objectives.mlm_terms(models.tied_logits(f, w, bias), labels)[0]
  want, want_grads = _value_and_grads(plain_nll, features, table, raw_bias, cot, vocab_size)
  got, got_grads = _value_and_grads(lambda f, w, bias: head(f, w, bias)[0], features, table,
                                    raw_bias, cot, vocab_size)
  np.testing.assert_allclose(got, want, rtol=1e-5 if dtype == jnp.float32 else 1e-3)
  rtol = 2e-5 if dtype == jnp.float32 else 2e-2
  for name, g, w in zip(("features", "table", "bias"), got_grads, want_grads):
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * np.abs(w).max(), err_msg=name)
  bias = models.mask_vocab_padding(raw_bias, vocab_size)
  _, argmax, sample = head(features, table, bias)
  logits = np.asarray(models.tied_logits(features, table, bias), np.float64)
  np.testing.assert_array_equal(argmax, objectives.first_argmax(jnp.asarray(logits)))
  noisy = (logits / tau).reshape(b * p, v) + _gumbel_numpy(int(keys[0]), int(keys[1]), b * p, v)
  want_sample = noisy[:, :vocab_size].argmax(-1).reshape(b, p)
  # float32 against float64 noise: a near-tie may go either way; none here.
  np.testing.assert_array_equal(sample, want_sample)
  assert sample.dtype == jnp.int32 and (np.asarray(sample) < vocab_size).all()


def test_the_heads_samples_follow_softmax_of_logits_over_tau():
  """Over 20,000 rows with the same logits the sample's frequencies are softmax(s / tau)
  (within 4 standard deviations each), never a padding column; other keys, other draws."""
  v, vocab_size, tau, rows = 128, 6, 0.5, 20_000
  rng = np.random.default_rng(6)
  table = jnp.asarray(rng.normal(size=(v, 8)), jnp.float32)
  features = jnp.asarray(np.tile(rng.normal(size=(1, 1, 8)), (rows, 1, 1)), jnp.float32)
  bias = models.mask_vocab_padding(jnp.zeros((v,), jnp.float32), vocab_size)
  labels = jnp.zeros((rows, 1), jnp.int32)
  draw = lambda keys: np.asarray(fused_logsumexp.pallas_mlm_head(
      features, table, bias, labels, jnp.asarray(keys, jnp.int32), tau, vocab_size, True,
      2048, 128)[2]).reshape(-1)
  sample = draw([1, 2])
  logits = np.asarray(models.tied_logits(features[:1, 0], table, bias), np.float64)[0]
  probs = np.exp((logits - logits.max()) / tau)
  probs[vocab_size:] = 0
  probs /= probs.sum()
  freq = np.bincount(sample, minlength=v) / rows
  assert (freq[vocab_size:] == 0).all()
  assert (np.abs(freq - probs) <= 4 * np.sqrt(probs * (1 - probs) / rows) + 1e-12).all(), (
      freq[:vocab_size], probs[:vocab_size])
  assert (draw([1, 3]) != sample).mean() > 0.1


def test_pallas_mlm_head_under_a_sharded_jit_draws_the_whole_batchs_samples():
  """On 8 CPU devices each device's rows continue the global row index: the same nll, argmax,
  samples and gradients as one device on the whole batch."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("replica", "data"))
  rows = NamedSharding(mesh, P(("replica", "data")))
  features, table, raw_bias, cot = _inputs(8, 3, 16, 256, 250, jnp.float32, seed=8)
  labels = jnp.asarray(np.random.default_rng(8).integers(0, 250, (8, 3)), jnp.int32)
  keys = jnp.asarray([5, 6], jnp.int32)

  def run(m):
    def loss(f, w, b):
      nll, argmax, sample = fused_logsumexp.pallas_mlm_head(
          f, w, models.mask_vocab_padding(b, 250), labels, keys, 1.0, 250, True, 8, 128, m)
      return (nll * cot).sum(), (argmax, sample)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
  split = run(mesh)(jax.device_put(features, rows), table, raw_bias)
  whole = run(None)(features, table, raw_bias)
  for a, b in zip(jax.tree.leaves(split), jax.tree.leaves(whole)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["script", "electra", "mlm"])
def test_every_objective_with_the_pallas_head_keeps_the_mlm_loss(objective):
  """mlm_head_impl=pallas: the MLM loss, its accuracy and (for MLM, which draws nothing) the
  loss and gradients equal the xla head's; SCRIPT and ELECTRA train on other draws (finite)."""
  small_vocab = {"model.vocab_size": 500, "objective": objective}
  config = load_config("tiny", **small_vocab)
  pallas = load_config("tiny", **small_vocab, mlm_head_impl="pallas")
  batch = random_batch(config, 4, seed=3)
  model = models.build_model(config)
  params = model.init(jax.random.key(0), batch["input_ids"], batch["segment_ids"],
                      batch["input_mask"], batch["masked_positions"])["params"]
  rng = jax.random.key(5)
  objective_fn = objectives.get_objective(objective)

  def value_and_grad(c):
    loss = lambda p: objective_fn(p, batch, rng, model=model, config=c)
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  (want, want_metrics), want_grads = value_and_grad(config)
  (got, got_metrics), got_grads = value_and_grad(pallas)
  for key in ("mlm_loss", "mlm_accuracy"):
    np.testing.assert_allclose(got_metrics[key], want_metrics[key], rtol=1e-5, err_msg=key)
  assert np.isfinite(got)
  if objective == "mlm":
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
      np.testing.assert_allclose(g, w, rtol=2e-4, atol=1e-6)
  else:
    assert got_metrics["disc_loss"] != want_metrics["disc_loss"]  # other samples


def test_the_pallas_head_draws_by_gumbel_max_only():
  from script_jax import config_lib  # pylint: disable=g-import-not-at-top
  config = load_config("tiny", mlm_head_impl="pallas", sampler="inverse_cdf")
  with pytest.raises(config_lib.ConfigError, match="sampler=gumbel"):
    config_lib.validate_config(config)
