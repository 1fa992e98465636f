"""Tests of script_jax/data/pipeline.py: masking, sharding over hosts, determinism, resume."""

import collections
import itertools
import os

import numpy as np
import pytest
import tensorflow as tf

from script_jax import config_lib
from script_jax.data import pipeline
from script_jax.data import preparation
from script_jax.data.corpus import DataError

SPECIAL = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}


def small_config(batch_size=16):
  c = config_lib.base_config()
  c.model.vocab_size = 512
  c.seq_len = 64
  c.batch_size = batch_size
  c.mask.max_predictions_per_seq = config_lib.max_predictions_for(c.seq_len)
  c.data.tokenizer = "sentencepiece"
  c.data.num_shards = 4
  c.data.shuffle_buffer = 500
  return c


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("data"))
  return out, preparation.prepare(small_config(), out, num_workers=1)


def batches(config, data, n, **kwargs):
  out, metadata = data
  ds = pipeline.create_pretraining_dataset(config, metadata, out, **kwargs)
  return list(itertools.islice(ds.as_numpy_iterator(), n))


def unmasked(batch):
  """The original input ids: the masked positions given back their masked_ids."""
  ids = batch["input_ids"].copy()
  for b, (positions, originals, weights) in enumerate(zip(
      batch["masked_positions"], batch["masked_ids"], batch["masked_weights"])):
    real = weights > 0
    ids[b, positions[real]] = originals[real]
  return ids


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ---------------------------------------------------------------------------------------------
# Masking, on synthetic batches (independent NumPy reference for the counts).


def synthetic_ids(rng, batch_size, seq_len, vocab_size):
  """[CLS] tokens [SEP] [PAD]..., with random lengths and some [UNK] among the tokens."""
  ids = rng.integers(5, vocab_size, size=(batch_size, seq_len))
  lengths = rng.integers(3, seq_len + 1, size=batch_size)
  ids[rng.random((batch_size, seq_len)) < 0.05] = SPECIAL["unk"]
  ids[:, 0] = SPECIAL["cls"]
  ids[np.arange(batch_size), lengths - 1] = SPECIAL["sep"]
  ids[np.arange(seq_len)[None, :] >= lengths[:, None]] = SPECIAL["pad"]
  return ids.astype(np.int32)


def run_mask(ids, spec, seed=(1, 2)):
  out = pipeline.mask_batch(tf.constant(ids), tf.constant(seed, tf.int64), spec)
  return {k: v.numpy() for k, v in out.items()}


@pytest.mark.parametrize("mask_token_prob, random_token_prob", [(0.8, 0.1), (0.85, 0.15)])
def test_masking_statistics(mask_token_prob, random_token_prob):
  rng = np.random.default_rng(0)
  seq_len, max_predictions, vocab_size = 128, 20, 1000
  spec = pipeline.MaskingSpec(
      vocab_size=vocab_size, special_ids=tuple(SPECIAL.values()), pad_id=0, mask_id=4,
      mask_prob=0.15, max_predictions=max_predictions, mask_token_prob=mask_token_prob,
      random_token_prob=random_token_prob)
  ids = synthetic_ids(rng, 4096, seq_len, vocab_size)
  out = run_mask(ids, spec)
  positions, masked_ids, weights = out["masked_positions"], out["masked_ids"], out["masked_weights"]
  real = weights > 0
  rows = np.arange(len(ids))[:, None]

  # How many: round(15% of the candidates), at least 1, at most max_predictions (NumPy reference).
  candidates = (ids > 4)
  n = candidates.sum(-1)
  expected = np.minimum(np.clip(np.round(n * 0.15), 1, max_predictions), n)
  np.testing.assert_array_equal(real.sum(-1), expected)
  share = real.sum() / n.sum()
  assert 0.14 < share < 0.16

  # Which: real slots first, ascending distinct candidate positions; padding slots all zero.
  assert np.all(np.diff(real.astype(int), axis=-1) <= 0)
  assert np.all(candidates[rows, positions][real])  # never special, never padding
  assert np.all(np.diff(np.where(real, positions, seq_len), axis=-1)[real[:, 1:]] > 0)
  assert np.all(positions[~real] == 0) and np.all(masked_ids[~real] == 0)
  np.testing.assert_array_equal(masked_ids[real], ids[rows, positions][real])  # the originals
  # Every candidate position is about as likely (seen: position histogram over sequences of
  # full length).
  full = n >= 100
  counts = np.bincount(positions[full][real[full]], minlength=seq_len)[1:100]
  assert counts.min() > 0.6 * counts.mean() and counts.max() < 1.4 * counts.mean()

  # What they become.
  new = out["input_ids"][rows, positions][real]
  original = ids[rows, positions][real]
  is_mask = new == SPECIAL["mask"]
  is_kept = new == original
  is_random = ~is_mask & ~is_kept
  assert abs(is_mask.mean() - mask_token_prob) < 0.01
  # A random token equal to the original (p = 1/995) counts as kept here.
  assert abs(is_random.mean() - random_token_prob) < 0.01
  assert abs(is_kept.mean() - (1 - mask_token_prob - random_token_prob)) < 0.01
  assert np.all(new[is_random] > 4)  # random tokens are never special
  # Nothing else changes.
  unchanged = np.ones_like(ids, bool)
  unchanged[rows.repeat(max_predictions, 1)[real], positions[real]] = False
  np.testing.assert_array_equal(out["input_ids"][unchanged], ids[unchanged])
  np.testing.assert_array_equal(out["input_mask"], (ids != 0).astype(np.int32))
  assert out["input_ids"].dtype == np.int32 and weights.dtype == np.float32


def test_masking_caps_at_max_predictions_and_handles_no_candidates():
  spec = pipeline.MaskingSpec(vocab_size=50, special_ids=(0, 1, 2, 3, 4), pad_id=0,
                                    mask_id=4, max_predictions=3)
  ids = np.array([[2] + [7] * 60 + [3],  # 60 candidates: 15% = 9, capped at 3
                  [2, 1, 1, 3] + [0] * 58,  # only [UNK]s: nothing to mask
                  [2, 9, 3] + [0] * 59], np.int32)  # 1 candidate: 1 prediction
  out = run_mask(ids, spec)
  np.testing.assert_array_equal(out["masked_weights"].sum(-1), [3, 0, 1])
  np.testing.assert_array_equal(out["input_ids"][1], ids[1])
  np.testing.assert_array_equal(out["masked_positions"][2], [1, 0, 0])
  np.testing.assert_array_equal(out["masked_ids"][2], [9, 0, 0])


def test_masking_is_a_function_of_the_seed():
  spec = pipeline.MaskingSpec(vocab_size=100, special_ids=(0, 1, 2, 3, 4), pad_id=0,
                                    mask_id=4)
  ids = synthetic_ids(np.random.default_rng(1), 8, 64, 100)
  a, b, c = run_mask(ids, spec, (5, 6)), run_mask(ids, spec, (5, 6)), run_mask(ids, spec, (5, 7))
  assert_batches_equal([a], [b])
  assert not np.array_equal(a["masked_positions"], c["masked_positions"])


# ---------------------------------------------------------------------------------------------
# The dataset.


def test_batches_shapes_and_contents(data):
  config = small_config()
  (batch,) = batches(config, data, 1)
  p = config.mask.max_predictions_per_seq
  expected = {"input_ids": ((16, 64), np.int32), "input_mask": ((16, 64), np.int32),
              "segment_ids": ((16, 64), np.int32), "masked_positions": ((16, p), np.int32),
              "masked_ids": ((16, p), np.int32), "masked_weights": ((16, p), np.float32)}
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
  original = unmasked(batch)
  assert np.all(original[:, 0] == SPECIAL["cls"])
  np.testing.assert_array_equal(batch["input_mask"], original != SPECIAL["pad"])
  assert np.all(batch["segment_ids"][original == SPECIAL["pad"]] == 0)
  assert np.any(batch["segment_ids"] == 1)
  assert np.all(batch["masked_weights"].sum(-1) >= 1)


def test_static_shapes(data):
  out, metadata = data
  ds = pipeline.create_pretraining_dataset(small_config(), metadata, out, process_count=2)
  assert ds.element_spec["input_ids"].shape == (8, 64)
  assert ds.element_spec["masked_weights"].shape == (8, 9)


@pytest.mark.parametrize("order", config_lib.DATA_ORDERS)
def test_same_seed_same_batches_other_seed_other_batches(data, order):
  config = small_config()
  config.data.order = order
  a, b = batches(config, data, 4), batches(config, data, 4)
  assert_batches_equal(a, b)
  config.seed = 1
  c = batches(config, data, 4)
  assert not np.array_equal(unmasked(a[0]), unmasked(c[0]))  # another order
  assert not np.array_equal(a[0]["masked_positions"], c[0]["masked_positions"])


@pytest.mark.parametrize("order", config_lib.DATA_ORDERS)
@pytest.mark.parametrize("process_count", [1, 2])
def test_resume_equals_uninterrupted_run(data, process_count, order):
  config = small_config()
  config.data.order = order
  _, metadata = data
  per_host = config.batch_size // process_count
  host_examples = sum(s["num_examples"] for s in metadata["shards"][0::process_count])
  start = host_examples // per_host + 3  # past the end of the first epoch
  full = batches(config, data, start + 5, process_count=process_count)
  resumed = batches(config, data, 5, start_step=start, process_count=process_count)
  assert_batches_equal(full[start:], resumed)
  resumed = batches(config, data, 5, start_step=7, process_count=process_count)
  assert_batches_equal(full[7:12], resumed)
  last = host_examples // per_host - 2  # the first epoch's last batches, into the next
  assert_batches_equal(full[last:last + 5], batches(config, data, 5, start_step=last,
                                                    process_count=process_count))


@pytest.mark.parametrize("order", config_lib.DATA_ORDERS)
def test_epochs_cover_the_data_and_hosts_are_disjoint(data, order):
  config = small_config()
  config.data.order = order
  out, metadata = data
  shard_rows = {}
  for s in metadata["shards"]:
    ds = tf.data.TFRecordDataset(os.path.join(out, s["file"])).map(
        lambda r: tf.io.parse_single_example(r, {
            "input_ids": tf.io.FixedLenFeature([64], tf.int64)})["input_ids"])
    shard_rows[s["file"]] = sorted(tuple(r) for r in ds.as_numpy_iterator())
  everything = collections.Counter(itertools.chain(*shard_rows.values()))
  seen = []
  for process_index in range(2):
    host_files = [s["file"] for s in metadata["shards"][process_index::2]]
    expected = collections.Counter(itertools.chain(*(shard_rows[f] for f in host_files)))
    # One epoch of this host: its shards' sequences, each once (short ones can repeat in the
    # corpus, hence multisets).
    n = expected.total() // 8
    rows = collections.Counter(tuple(r) for b in batches(
        config, data, n, process_index=process_index, process_count=2) for r in unmasked(b))
    assert rows.total() == n * 8
    assert not rows - expected  # nothing from elsewhere, nothing twice
    assert (expected - rows).total() < 8  # all but the incomplete last batch
    seen.append(rows)
  # The hosts read disjoint data: they share only sequences that the corpus has more than once.
  assert all(everything[row] > 1 for row in seen[0] & seen[1])
  assert everything.total() == metadata["num_examples"]


def test_errors(data):
  out, metadata = data
  with pytest.raises(DataError, match="batch_size=16 does not divide evenly over 3 processes"):
    pipeline.create_pretraining_dataset(small_config(), metadata, out, process_count=3)
  with pytest.raises(DataError, match="has 4 shards but there are 8 processes"):
    pipeline.create_pretraining_dataset(small_config(), metadata, out, process_count=8)
  config = small_config()
  config.seq_len = 128
  with pytest.raises(DataError, match="prepared with seq_len 64, not config.seq_len=128"):
    pipeline.create_pretraining_dataset(config, metadata, out)
  config = small_config()
  config.data.tokenizer = "wordpiece"
  with pytest.raises(DataError, match="tokenizer 'sentencepiece', not config.data.tokenizer"):
    pipeline.create_pretraining_dataset(config, metadata, out)
  config = small_config()
  config.model.vocab_size = 30522
  with pytest.raises(DataError, match="vocab_size 512, not config.model.vocab_size=30522"):
    pipeline.create_pretraining_dataset(config, metadata, out)
  with pytest.raises(DataError, match="missing"):
    pipeline.create_pretraining_dataset(small_config(), metadata, "/nonexistent")
