"""The sharded train step: equal on 8 fake devices and on 1, optimizer details, config checks."""

import json
import re

import jax
import numpy as np
import pytest
from helpers import load_config, random_batch, run_steps
from script_jax.bench import hlo_collectives

from script_jax import models
from script_jax import sharding as sharding_lib
from script_jax import state as state_lib
from script_jax import config_lib
from script_jax import train
from script_jax.data import synthetic


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["script", "electra", "mlm"])
def test_sharded_step_on_8_devices_equals_1_device(objective):
  assert jax.device_count() == 8
  config = load_config("tiny", objective=objective, batch_size=8,
                       **{"optim.warmup_steps": 1})
  batches = [random_batch(config, 8, seed=s) for s in (10, 11)]
  params8, losses8 = run_steps(config, jax.devices(), batches)
  params1, losses1 = run_steps(config, jax.devices()[:1], batches)
  np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(params8), jax.tree.leaves(params1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert losses8[1] != losses8[0]


@pytest.mark.slow
def test_rbg_step_randomness_is_sharded_step_indexed_and_its_own_stream():
  """rng_impl=rbg: a real sharded step, the same numbers for the same step, not threefry's."""
  config = load_config("tiny", batch_size=8, **{"optim.warmup_steps": 1})
  batch = random_batch(config, 8, seed=12)
  _, losses_rbg = run_steps(load_config("tiny", batch_size=8, rng_impl="rbg",
                                         **{"optim.warmup_steps": 1}), jax.devices(), [batch])
  _, again = run_steps(load_config("tiny", batch_size=8, rng_impl="rbg",
                                    **{"optim.warmup_steps": 1}), jax.devices(), [batch])
  _, losses_fry = run_steps(config, jax.devices(), [batch])
  assert np.isfinite(losses_rbg[0]) and losses_rbg == again
  assert losses_rbg[0] != losses_fry[0]


@pytest.mark.parametrize("rng_impl", ["threefry2x32", "rbg"])
def test_dropout_keeps_its_rate_under_each_rng_impl(rng_impl):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  x = jax.numpy.ones((64, 128, 256))
  y = nn.Dropout(0.1, deterministic=False).apply(
      {}, x, rngs={"dropout": jax.random.key(5, impl=rng_impl)})
  kept = float((y != 0).mean())
  assert abs(kept - 0.9) < 0.003
  np.testing.assert_allclose(float(y.max()), 1 / 0.9, rtol=1e-6)


def test_weight_decay_skips_layernorm_and_biases():
  config = load_config("tiny")
  model = models.build_model(config)
  state, _ = state_lib.init_state(config, model, sharding_lib.create_mesh(config))
  mask = state_lib.weight_decay_mask(state.params)
  flat = {"/".join(k): v for k, v in
          __import__("flax").traverse_util.flatten_dict(mask).items()}
  assert flat["encoder/layer_0/intermediate/kernel"]
  assert flat["embeddings/word_embeddings/embedding"]
  assert not flat["encoder/layer_0/intermediate/bias"]
  assert not flat["encoder/layer_0/ffn_norm/scale"]
  assert not flat["output_bias"]


def test_learning_rate_warms_up_then_decays_to_zero():
  config = load_config("tiny", num_train_steps=100, **{"optim.warmup_steps": 10,
                                                       "optim.learning_rate": 1.0})
  schedule = state_lib.learning_rate_schedule(config)
  np.testing.assert_allclose([schedule(0), schedule(5), schedule(10), schedule(55), schedule(100)],
                             [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)


@pytest.mark.parametrize("override,message", [
    ({"batch_size": 12}, "batch_size 12 is not divisible by the 8 data-parallel devices"),
    ({"objective": "gan"}, "unknown objective 'gan'"),
    ({"model.num_heads": 3}, "not divisible by model.num_heads"),
    ({"seq_len": 512}, "exceeds model.max_position_embeddings"),
    ({"mesh.model": 3}, "does not cover the 8 devices"),
    ({"mesh.model": 2}, "mesh.model=2: model parallelism is not implemented"),
    ({"script.disc_positions": "some"}, "script.disc_positions must be one of all, masked"),
    ({"sampler": "topk"}, "sampler must be one of gumbel, inverse_cdf"),
    ({"rng_impl": "philox"}, "rng_impl must be one of auto, threefry2x32, rbg, unsafe_rbg"),
    ({"mesh.fsdp_replicas": 2}, "applies only with mesh.fsdp=True"),
    ({"optim.on_nonfinite": "rollback"}, "optim.on_nonfinite must be one of stop, skip"),
    ({"optim.max_consecutive_skips": 0}, "optim.max_consecutive_skips=0 must be 1 or more"),
    ({"mesh.fsdp": True, "mesh.fsdp_replicas": 3}, "fsdp_replicas=3 x data=-1 x model=1 does "
                                                   "not cover the 8 devices"),
    ({"mesh.fsdp": True, "mesh.fsdp_replicas": 4, "batch_size": 4},
     "batch_size 4 is not divisible by the 8 data-parallel devices"),
])
def test_inconsistent_configs_are_clear_errors(override, message):
  config = load_config("tiny", **override)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate_config(config)


def test_fsdp_replicas_follow_the_slices():
  """One FSDP group per slice by default; a group never spans two slices."""
  fsdp = load_config("tiny", **{"mesh.fsdp": True})
  assert sharding_lib.fsdp_replicas(fsdp, num_slices=4) == 4
  assert sharding_lib.fsdp_replicas(load_config("tiny"), num_slices=4) == 1
  config_lib.validate_config(fsdp, num_devices=8, process_count=1, num_slices=2)
  split = load_config("tiny", **{"mesh.fsdp": True, "mesh.fsdp_replicas": 2})
  with pytest.raises(config_lib.ConfigError, match="must be a multiple of the 4 slices"):
    config_lib.validate_config(split, num_devices=8, process_count=1, num_slices=4)


def test_encoder_params_have_one_layout_whatever_the_objective():
  from script_jax import checkpoints  # pylint: disable=g-import-not-at-top
  trees = {}
  for objective in ("script", "electra", "mlm"):
    config = load_config("tiny", objective=objective)
    model = models.build_model(config)
    abstract = jax.eval_shape(lambda m=model, c=config: state_lib.create_train_state(
        c, m, jax.random.key(0)).params)
    trees[objective] = jax.tree.map(lambda x: x.shape,
                                    checkpoints.encoder_params(config, abstract))
  assert trees["script"] == trees["electra"] == trees["mlm"]


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["script", "electra"])
def test_scanned_layers_give_the_unrolled_loss_and_gradients(objective):
  """model.scan_layers (with remat) is a layout and a schedule, not a different model."""
  from script_jax import objectives  # pylint: disable=g-import-not-at-top
  plain = load_config("tiny", objective=objective, batch_size=4)
  scanned = load_config("tiny", objective=objective, batch_size=4,
                        **{"model.scan_layers": True, "model.remat": True})
  batch = {k: jax.numpy.asarray(v) for k, v in random_batch(plain, 4, seed=3).items()}
  rng = jax.random.key(7)
  results = {}
  for name, config in (("plain", plain), ("scanned", scanned)):
    model = models.build_model(config)
    params = jax.jit(lambda m=model, c=config: state_lib.create_train_state(
        c, m, jax.random.key(0)).params)()
    if name == "scanned":
      # The scanned init draws its own numbers: start both from the plain parameters.
      assert jax.tree.map(np.shape, params) == jax.tree.map(
          np.shape, models.stack_layers(results["plain"][2]))
      params = models.stack_layers(results["plain"][2])
    loss_fn = lambda p, c=config, m=model: objectives.get_objective(objective)(
        p, batch, rng, model=m, config=c)
    (loss, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    results[name] = (float(loss), models.unstack_layers(jax.device_get(grads)), params)
  np.testing.assert_allclose(results["scanned"][0], results["plain"][0], rtol=1e-5)
  flat_plain = jax.tree_util.tree_leaves_with_path(results["plain"][1])
  flat_scanned = dict(jax.tree_util.tree_leaves_with_path(results["scanned"][1]))
  assert len(flat_plain) == len(flat_scanned)
  for path, g in flat_plain:
    np.testing.assert_allclose(flat_scanned[path], g, rtol=2e-4, atol=1e-6, err_msg=str(path))
  assert any(np.abs(g).max() > 0 for p, g in flat_plain if "layer_1" in str(p))


def test_layer_layouts_convert_both_ways():
  config = load_config("tiny")
  model = models.build_model(config)
  params = jax.device_get(jax.jit(lambda: state_lib.create_train_state(
      config, model, jax.random.key(0)).params)())
  stacked = models.stack_layers(params)
  assert "layer_0" not in stacked["encoder"]
  assert stacked["encoder"]["layers"]["layer"]["intermediate"]["kernel"].shape[0] == 2
  back = models.unstack_layers(stacked)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  assert models.to_layout(params, scan_layers=True).keys() == stacked.keys()
  from script_jax import checkpoints  # pylint: disable=g-import-not-at-top
  enc = checkpoints.encoder_params(config, stacked)
  assert "layer_1" in enc["encoder"]


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["script", "electra"])
def test_fused_qkv_has_the_same_parameters_loss_and_gradients(objective):
  """model.fused_qkv is one matmul over the same three projections, not a different model."""
  from script_jax import objectives  # pylint: disable=g-import-not-at-top
  batch = None
  results = {}
  for fused in (False, True):
    config = load_config("tiny", objective=objective, batch_size=4,
                         **{"model.fused_qkv": fused})
    batch = batch or {k: jax.numpy.asarray(v)
                      for k, v in random_batch(config, 4, seed=5).items()}
    model = models.build_model(config)
    params = jax.jit(lambda m=model, c=config: state_lib.create_train_state(
        c, m, jax.random.key(0)).params)()
    loss_fn = lambda p, c=config, m=model: objectives.get_objective(objective)(
        p, batch, jax.random.key(9), model=m, config=c)
    (loss, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    results[fused] = (params, float(loss), jax.device_get(grads))
  (p0, l0, g0), (p1, l1, g1) = results[False], results[True]
  assert jax.tree.structure(p0) == jax.tree.structure(p1)
  for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)):
    np.testing.assert_array_equal(a, b)  # the same draws: checkpoints load either way
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(b, a, rtol=2e-4, atol=1e-6, err_msg=str(path))
  top = "encoder" if objective == "script" else "discriminator"
  assert np.abs(g0[top]["layer_0"]["attention"]["query"]["kernel"]).max() > 0


@pytest.mark.parametrize("keep_every,kept", [(0, [9, 10]), (4, [4, 8, 9, 10]),
                                             (2, [2, 4, 6, 8, 9, 10])])
def test_checkpoints_kept_for_curves_beside_the_last_ones(tmp_path, keep_every, kept):
  """keep_checkpoint_every_steps: orbax keeps every multiple of it and the last
  keep_checkpoints, the two policies combined."""
  from script_jax import checkpoints  # pylint: disable=g-import-not-at-top
  config = load_config("tiny", checkpoint_every_steps=1, keep_checkpoints=2,
                       keep_checkpoint_every_steps=keep_every)
  manager = checkpoints.make_manager(str(tmp_path), config)
  for step in range(1, 11):
    manager.save(step, args=checkpoints.ocp.args.StandardSave({"x": np.arange(3) + step}))
  manager.wait_until_finished()
  assert manager.all_steps() == kept
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == kept
  manager.close()


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["script", "electra", "mlm"])
@pytest.mark.parametrize("memory_flags", [False, True])
def test_compiled_step_has_only_the_gradient_and_metric_all_reduces(objective, memory_flags):
  """The optimized HLO of the data-parallel step on 8 devices: no all-gather, all-to-all,
  collective-permute or reduce-scatter (a device gathering the global batch's features, or a
  scatter's indices, costs a pod bandwidth it should not), with the memory flags off and on;
  and the random bits are drawn per device."""
  overrides = {"objective": objective, "batch_size": 16, "model.num_layers": 1,
               "electra.generator_num_layers": 1, "model.dropout_rate": 0.1}
  if memory_flags:
    overrides.update({"model.scan_layers": True, "model.remat": True,
                      "script.logsumexp_chunk": 64})
  config = load_config("tiny", **overrides)
  mesh = sharding_lib.create_mesh(config)
  model = models.build_model(config)
  state, sharding = state_lib.init_state(config, model, mesh)
  step = train.make_train_step(config, model, sharding, mesh)
  batch = train.to_global_batch(synthetic.random_masked_batch(config, 16, 0), mesh)
  hlo = step.lower(state, batch).compile().as_text()
  found = hlo_collectives.collectives(hlo)
  assert {c.kind for c in found} == {"all-reduce"}, [c for c in found if c.kind != "all-reduce"]
  # threefry (rng_impl auto on CPU) draws each device's own random bits (dropout masks, Gumbel
  # noise): its u32 arrays have the local batch of 2 rows, never the global 16.
  random_bits = re.findall(r"u32\[(\d+),[\d,]+\]", hlo)
  assert random_bits and "16" not in random_bits and "2" in random_bits, sorted(set(random_bits))


def test_electra_recipe_matches_a_numpy_reference_of_electras_optimizer():
  """optim.recipe="electra": clip to norm 1, Adam without bias correction, + weight decay off
  LayerNorm and biases, times -lr(t) with lr(t) = lr * (1 - t/T) * min(1, t/W); four steps
  against float64 NumPy."""
  config = load_config("tiny", **{"optim.recipe": "electra", "optim.warmup_steps": 3,
                                  "num_train_steps": 10, "optim.learning_rate": 1e-3})
  tx = state_lib.make_optimizer(config)
  rng = np.random.default_rng()
  params = {"dense": {"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=4)},
            "LayerNorm": {"scale": rng.normal(size=4)}}
  params = jax.tree.map(lambda x: jax.numpy.asarray(x, jax.numpy.float32), params)
  opt_state = tx.init(params)
  want = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  m = jax.tree.map(np.zeros_like, want)
  v = jax.tree.map(np.zeros_like, want)
  for t in range(4):
    grads = jax.tree.map(lambda x: rng.normal(size=x.shape) * 2.0, want)
    updates, opt_state = tx.update(jax.tree.map(lambda g: jax.numpy.asarray(g, jax.numpy.float32),
                                                grads), opt_state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    norm = np.sqrt(sum((g ** 2).sum() for g in jax.tree.leaves(grads)))
    clipped = jax.tree.map(lambda g: g * min(1.0, 1.0 / norm), grads)
    m = jax.tree.map(lambda a, g: 0.9 * a + 0.1 * g, m, clipped)
    v = jax.tree.map(lambda a, g: 0.999 * a + 0.001 * g * g, v, clipped)
    lr = 1e-3 * (1 - t / 10) * min(1.0, t / 3)
    decay = {"dense": {"kernel": 0.01, "bias": 0.0}, "LayerNorm": {"scale": 0.0}}
    want = jax.tree.map(lambda p, a, b, d: p - lr * (a / (np.sqrt(b) + 1e-6) + d * p),
                        want, m, v, decay)
    for got, expected in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
      np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
  assert float(state_lib.learning_rate_schedule(config)(0)) == 0.0  # step 0: no update


def test_optimizer_recipe_is_checked_and_kept_on_resume(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="optim.recipe must be one of optax, electra"):
    config_lib.validate_config(load_config("tiny", **{"optim.recipe": "lamb"}), num_devices=8)
  from script_jax import checkpoints  # pylint: disable=g-import-not-at-top
  checkpoints.write_run_config(str(tmp_path), load_config("tiny"))
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match="optim.recipe: workdir has 'optax', config asks for 'electra'"):
    checkpoints.check_run_config(str(tmp_path), load_config("tiny", **{"optim.recipe": "electra"}))


def test_a_run_config_older_than_a_key_reads_as_its_run_ran(tmp_path):
  """A run_config.json written before data.order (and the other config_lib.KEYS_ADDED_SINCE)
  existed reads back with the values that run used, not today's defaults ("windows"); a current
  one reads back as written. Readers take the values as they are (no fallbacks of their own)."""
  from script_jax import checkpoints  # pylint: disable=g-import-not-at-top
  config = load_config("tiny")
  checkpoints.write_run_config(str(tmp_path), config)
  assert json.loads(checkpoints.read_run_config(str(tmp_path)).to_json()) == json.loads(
      config.to_json())
  assert config.data.order == "windows"
  path = tmp_path / "run_config.json"
  old = json.loads(path.read_text())
  for dotted in config_lib.KEYS_ADDED_SINCE:
    *sections, name = dotted.split(".")
    node = old
    for section in sections:
      node = node[section]
    del node[name]
  path.write_text(json.dumps(old))
  read = checkpoints.read_run_config(str(tmp_path))
  assert read.data.order == "buffer" and read.optim.recipe == "optax"
  for dotted, value in config_lib.KEYS_ADDED_SINCE.items():
    node = read
    for part in dotted.split("."):
      node = node[part]
    assert node == value, dotted
  config_lib.validate_config(read, num_devices=8)
  assert sharding_lib.fsdp_replicas(read) == 1  # no FSDP: one whole copy


@pytest.mark.parametrize("requested, platform, remat, resolved", [
    ("auto", "tpu", False, "threefry2x32"), ("auto", "tpu", True, "threefry2x32"),
    ("auto", "gpu", False, "threefry2x32"), ("auto", "cpu", False, "threefry2x32"),
    ("rbg", "cpu", False, "rbg"), ("threefry2x32", "tpu", False, "threefry2x32")])
def test_rng_impl_auto_is_decided_per_platform(requested, platform, remat, resolved):
  assert config_lib.resolve_rng_impl(requested, platform, remat) == resolved


def test_libtpu_flag_for_runs_that_may_draw_rbg_bits():
  flag = config_lib.LIBTPU_RNG_FLAG
  args = lambda **o: config_lib.libtpu_init_args(load_config("tiny", **o), "--xla_foo=1")
  assert args() == "--xla_foo=1"  # auto: threefry on a TPU too
  assert args(rng_impl="rbg") == f"--xla_foo=1 {flag}"
  assert args(rng_impl="unsafe_rbg") == f"--xla_foo=1 {flag}"
  assert args(rng_impl="threefry2x32") == "--xla_foo=1"
  assert config_lib.libtpu_init_args(load_config("tiny", rng_impl="rbg"), flag) == flag  # not twice


def test_resume_with_another_random_stream_says_so(tmp_path):
  from script_jax import checkpoints  # pylint: disable=g-import-not-at-top
  checkpoints.write_run_config(str(tmp_path), load_config("tiny", rng_impl="rbg"))
  with pytest.raises(checkpoints.CheckpointMismatchError) as error:
    checkpoints.check_run_config(str(tmp_path), load_config("tiny", rng_impl="threefry2x32"))
  assert "rng_impl: workdir has 'rbg', config asks for 'threefry2x32'" in str(error.value)
  assert "--config.rng_impl=rbg" in str(error.value)


@pytest.mark.slow
def test_skip_mode_keeps_the_state_through_a_non_finite_step_and_is_exact_otherwise():
  """optim.on_nonfinite=skip: a NaN step leaves parameters and moments bit for bit; a finite
  step gives exactly the update of the default (stop) mode."""
  skip = load_config("tiny", batch_size=8, **{"optim.warmup_steps": 1,
                                              "optim.on_nonfinite": "skip"})
  stop = load_config("tiny", batch_size=8, **{"optim.warmup_steps": 1})
  mesh = sharding_lib.create_mesh(skip)
  model = models.build_model(skip)
  good = {k: np.asarray(v) for k, v in random_batch(skip, 8, seed=21).items()}
  poisoned = dict(good, masked_weights=np.full_like(good["masked_weights"], np.nan))

  state, sharding = state_lib.init_state(skip, model, mesh)
  before = jax.device_get((state.params, state.opt_state))
  step = train.make_train_step(skip, model, sharding, mesh)
  state, metrics = step(state, train.to_global_batch(poisoned, mesh))
  assert float(metrics["skipped"]) == 1.0 and not np.isfinite(float(metrics["loss"]))
  assert int(state.step) == 1
  after = jax.device_get((state.params, state.opt_state))
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(a, b)

  state, metrics = step(state, train.to_global_batch(good, mesh))
  assert float(metrics["skipped"]) == 0.0
  state_stop, sharding = state_lib.init_state(stop, model, mesh)
  step_stop = train.make_train_step(stop, model, sharding, mesh)
  state_stop = state_stop.replace(step=state_stop.step + 1)  # the same step: the same dropout
  state_stop, metrics_stop = step_stop(state_stop, train.to_global_batch(good, mesh))
  assert "skipped" not in metrics_stop
  assert float(metrics["loss"]) == float(metrics_stop["loss"])
  for a, b in zip(jax.tree.leaves(jax.device_get(state.params)),
                  jax.tree.leaves(jax.device_get(state_stop.params))):
    np.testing.assert_array_equal(a, b)
