"""The sharded train step: equal on 8 fake devices and on 1, optimizer details, config checks."""

import jax
import numpy as np
import pytest
from conftest import load_config
from test_objectives import _random_batch

from script_jax import models
from script_jax import train


def _run_steps(config, devices, batch_list):
  mesh = train.create_mesh(config, devices=devices)
  model = models.build_model(config)
  state, sharding = train.init_state(config, model, mesh)
  step = train.make_train_step(config, model, sharding, mesh)
  losses = []
  for b in batch_list:
    state, metrics = step(state, train.to_global_batch({k: np.asarray(v) for k, v in b.items()},
                                                       mesh))
    losses.append(float(metrics["loss"]))
  return jax.device_get(state.params), losses


@pytest.mark.parametrize("objective", ["script", "electra", "mlm"])
def test_sharded_step_on_8_devices_equals_1_device(objective):
  assert jax.device_count() == 8
  config = load_config("tiny", objective=objective, batch_size=8,
                       **{"optim.warmup_steps": 1})
  batches = [_random_batch(config, 8, seed=s) for s in (10, 11)]
  params8, losses8 = _run_steps(config, jax.devices(), batches)
  params1, losses1 = _run_steps(config, jax.devices()[:1], batches)
  np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(params8), jax.tree.leaves(params1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert losses8[1] != losses8[0]


def test_weight_decay_skips_layernorm_and_biases():
  config = load_config("tiny")
  model = models.build_model(config)
  state, _ = train.init_state(config, model, train.create_mesh(config))
  mask = train.weight_decay_mask(state.params)
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
  schedule = train.learning_rate_schedule(config)
  np.testing.assert_allclose([schedule(0), schedule(5), schedule(10), schedule(55), schedule(100)],
                             [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)


@pytest.mark.parametrize("override,message", [
    ({"batch_size": 12}, "batch_size 12 is not divisible by the 8 data-parallel devices"),
    ({"objective": "gan"}, "unknown objective 'gan'"),
    ({"model.num_heads": 3}, "not divisible by model.num_heads"),
    ({"seq_len": 512}, "exceeds model.max_position_embeddings"),
    ({"mesh.model": 3}, "does not cover the 8 devices"),
])
def test_inconsistent_configs_are_clear_errors(override, message):
  config = load_config("tiny", **override)
  with pytest.raises(train.ConfigError, match=message):
    train.validate_config(config)


def test_encoder_params_have_one_layout_whatever_the_objective():
  from script_jax import checkpoints  # pylint: disable=g-import-not-at-top
  trees = {}
  for objective in ("script", "electra", "mlm"):
    config = load_config("tiny", objective=objective)
    model = models.build_model(config)
    abstract = jax.eval_shape(lambda m=model, c=config: train.create_train_state(
        c, m, jax.random.key(0)).params)
    trees[objective] = jax.tree.map(lambda x: x.shape,
                                    checkpoints.encoder_params(config, abstract))
  assert trees["script"] == trees["electra"] == trees["mlm"]
