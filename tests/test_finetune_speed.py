"""The fine-tuning benchmark runs our GLUE and SQuAD steps (and HF's where torch is installed)."""

import jax
import pytest
from helpers import load_config

from script_jax.bench import finetune_speed


def _config():
  return load_config("tiny", **{"model.num_layers": 1})


def _check(report, side):
  assert set(report["results"]) == {"glue", "squad"}
  for task, entry in report["results"].items():
    assert entry["seq_len"] == 32 and entry["batch_size"] == 8, task
    r = entry[side]
    assert r["examples_per_sec"] > 0 and len(r["window_seconds"]) == 2, task
    assert r["num_params"] > 0
  assert "examples/s" in finetune_speed.format_table(report)


@pytest.mark.slow
def test_ours_on_a_tiny_config():
  report = finetune_speed.run_benchmark(_config(), lengths=(32, 32), batch_size=8, steps=2,
                                        warmup=1, repeats=2, hf=False,
                                        devices=jax.devices()[:1], log=lambda _: None)
  _check(report, "ours")
  assert "hf" not in report["results"]["glue"]
  assert report["settings"]["lengths"] == {"glue": 32, "squad": 32}


def test_random_batches_have_the_task_shapes():
  glue = finetune_speed.random_batch("glue", 4, 16, 100)
  assert glue["input_ids"].shape == (4, 16) and glue["labels"].shape == (4,)
  squad = finetune_speed.random_batch("squad", 4, 16, 100)
  assert squad["context_mask"].shape == (4, 16)
  assert (squad["start_positions"] <= squad["end_positions"]).all()
  assert (squad["end_positions"] < 16).all() and (squad["start_positions"] >= 4).all()


@pytest.mark.slow
def test_hf_peer_beside_ours():
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  config = _config()
  report = finetune_speed.run_benchmark(config, lengths=(32, 32), batch_size=8, steps=2,
                                        warmup=1, repeats=2, hf=True,
                                        devices=jax.devices()[:1], log=lambda _: None)
  _check(report, "hf")
  _check(report, "ours")
  for task in ("glue", "squad"):
    assert report["results"][task]["ours_over_hf"] > 0
  # Same encoder sizes on both sides: HF's sequence-classification head has one more H x H dense.
  h = config.model.hidden_size
  glue = report["results"]["glue"]
  assert glue["hf"]["num_params"] - glue["ours"]["num_params"] == h * h + h
  squad = report["results"]["squad"]
  assert squad["ours"]["num_params"] - squad["hf"]["num_params"] == h + 1  # our no-answer logit
