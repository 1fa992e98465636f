"""The HuggingFace peer builds the same shapes as ours and runs a step (needs torch, transformers).

torch and transformers are optional benchmark dependencies: without them these tests skip.
"""

import math

import jax
import pytest
from helpers import load_config

from script_jax.data import synthetic
from script_jax import models

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


def _hf_peer():
  from script_jax.bench import hf_training  # pylint: disable=import-outside-toplevel
  return hf_training


def _our_num_params(config):
  model = models.build_model(config)
  b = synthetic.random_masked_batch(config, 1)
  params = jax.eval_shape(lambda r: model.init(r, b["input_ids"], b["segment_ids"],
                                               b["input_mask"], b["masked_positions"]),
                          jax.random.key(0))["params"]
  return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


@pytest.mark.parametrize("objective", ["electra", "mlm"])
def test_hf_models_have_our_shapes_and_train(objective):
  hf_peer = _hf_peer()
  config = load_config("tiny", objective=objective, **{"model.num_layers": 1,
                                                       "electra.generator_num_layers": 1})
  hf_model = hf_peer.build_hf_model(config, objective)
  assert sum(p.numel() for p in hf_model.parameters()) == _our_num_params(config)
  if objective == "electra":  # shared embeddings and a tied generator decoder, as ours
    assert hf_model.generator.electra.embeddings is hf_model.discriminator.electra.embeddings
    assert (hf_model.generator.generator_lm_head.weight
            is hf_model.discriminator.electra.embeddings.word_embeddings.weight)
  result = hf_peer.time_hf(config, objective, synthetic.random_masked_batch(config, 2), steps=1,
                           warmup=1, repeats=1, log=lambda _: None)
  assert result["steps_per_sec"] > 0 and result["num_params"] == _our_num_params(config)
