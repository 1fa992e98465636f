"""Random masked batches of the pipeline's shapes: the one batch builder of tests and benchmarks.

Both forms are what `pipeline.create_pretraining_dataset` yields for a config (input_ids with
[MASK] (id 4) at the masked positions, input_mask, segment_ids, masked_positions, masked_ids,
masked_weights); ids are drawn from [5, vocab_size), so never a special token of ours.

  ragged=False  every sequence full length and every prediction slot used: the shapes the
                benchmarks time (values do not change the speed).
  ragged=True   sequences of random lengths (T/2..T, padded), a random share of the slots
                used: what the tests feed the losses and the train step (golden losses included,
                so this stream must not change).
"""

from __future__ import annotations

import numpy as np

MASK_ID = 4  # the [MASK] id of the sentencepiece tokenizers trained here


def random_masked_batch(config, batch_size: int, seed: int = 0,
                        ragged: bool = False) -> dict[str, np.ndarray]:
  """A masked batch for `config` (seq_len, mask.max_predictions_per_seq, model.vocab_size)."""
  rng = np.random.default_rng(seed)
  t, p, v = config.seq_len, config.mask.max_predictions_per_seq, config.model.vocab_size
  if not ragged:
    ids = rng.integers(5, v, size=(batch_size, t), dtype=np.int32)
    positions = np.sort(np.stack([rng.choice(np.arange(1, t - 1), size=p, replace=False)
                                  for _ in range(batch_size)]), axis=1).astype(np.int32)
    masked_ids = np.take_along_axis(ids, positions, axis=1)
    masked_input = ids.copy()
    np.put_along_axis(masked_input, positions, MASK_ID, axis=1)
    return {
        "input_ids": masked_input,
        "input_mask": np.ones((batch_size, t), np.int32),
        "segment_ids": (np.arange(t)[None] >= t // 2).repeat(batch_size, 0).astype(np.int32),
        "masked_positions": positions,
        "masked_ids": masked_ids,
        "masked_weights": np.ones((batch_size, p), np.float32),
    }
  ids = rng.integers(5, v, size=(batch_size, t))
  lengths = rng.integers(t // 2, t + 1, size=batch_size)
  input_mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
  positions = np.stack([np.sort(rng.permutation(np.arange(1, n - 1))[:p]) for n in lengths])
  weights = (np.arange(p)[None] < rng.integers(p // 2, p + 1, size=(batch_size, 1)))
  positions = np.where(weights, positions, 0)
  masked_ids = np.where(weights, np.take_along_axis(ids, positions, 1), 0)
  masked_input = ids.copy()
  for b in range(batch_size):
    masked_input[b, positions[b][weights[b]]] = MASK_ID
  return {"input_ids": (masked_input * input_mask).astype(np.int32),
          "input_mask": input_mask,
          "segment_ids": ((np.arange(t)[None] >= lengths[:, None] // 2) * input_mask
                          ).astype(np.int32),
          "masked_positions": positions.astype(np.int32),
          "masked_ids": masked_ids.astype(np.int32),
          "masked_weights": weights.astype(np.float32)}
