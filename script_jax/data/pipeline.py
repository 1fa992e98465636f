"""Prepared shards to per-host batches of dynamically masked sequences, as a tf.data pipeline.

  metadata = preparation.prepare_pretraining_data(config, workdir)
  ds = pipeline.create_pretraining_dataset(config, metadata, data_dir, start_step=step,
                                                 process_index=jax.process_index(),
                                                 process_count=jax.process_count())
  for batch in ds.as_numpy_iterator(): ...

Each host reads its own shards (shards[process_index::process_count]), shuffles them with
config.seed (config.data.order: within windows, or through a shuffle buffer), repeats them
without end, and batches config.batch_size // process_count sequences with static shapes. Masking (BERT's, Devlin et al., 2019, Section 3.1) is done in the graph on
whole batches, seeded by (config.seed, process index, step) with stateless random ops: the same
seed gives the same batches, and `start_step=N` gives exactly the batches an uninterrupted run
gives from step N, without reading through the first N.

A batch (B = per-host batch size, T = config.seq_len, P = config.mask.max_predictions_per_seq):
  input_ids        int32 [B, T]  the masked input
  input_mask       int32 [B, T]  1 for tokens, 0 for padding
  segment_ids      int32 [B, T]  0 for [CLS] A [SEP], 1 for B [SEP]
  masked_positions int32 [B, P]  positions chosen for prediction, ascending; 0 in unused slots
  masked_ids       int32 [B, P]  the ORIGINAL ids there; 0 in unused slots
  masked_weights float32 [B, P]  1.0 for a prediction, 0.0 for an unused slot
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np
import tensorflow as tf

from script_jax import config_lib
from script_jax import fs
from script_jax.data import prepared_folder
from script_jax.data.corpus import DataError

_EPOCHS = 2**62  # "repeat forever" as a range, so an epoch's number can seed its shuffle


@dataclasses.dataclass(frozen=True)
class MaskingSpec:
  """What masking needs to know: the config's mask.* and the tokenizer's ids."""
  vocab_size: int
  special_ids: tuple[int, ...]  # never masked, never used as random replacements
  pad_id: int
  mask_id: int
  mask_prob: float = 0.15
  max_predictions: int = 20
  mask_token_prob: float = 0.8
  random_token_prob: float = 0.1

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, metadata: dict) -> "MaskingSpec":
    special = metadata["special_ids"]
    return cls(vocab_size=metadata["vocab_size"],
               special_ids=tuple(sorted(set(special.values()))),
               pad_id=special["pad"], mask_id=special["mask"],
               mask_prob=config.mask.mask_prob,
               max_predictions=config.mask.max_predictions_per_seq,
               mask_token_prob=config.mask.mask_token_prob,
               random_token_prob=config.mask.random_token_prob)


def mask_batch(input_ids_BxT: tf.Tensor, seed: tf.Tensor, spec: MaskingSpec) -> dict:
  """BERT's masking of a batch, vectorised; a pure function of (ids, seed).

  In each sequence, round(mask_prob * n) of its n non-special, non-padding tokens (at least 1,
  at most spec.max_predictions, never more than n) are chosen uniformly at random. Each chosen
  token becomes [MASK] with probability mask_token_prob, a random non-special token with
  probability random_token_prob, and stays as it is otherwise.

  Args:
    input_ids_BxT: int32 token ids.
    seed: int32/int64 [2], the seed of tf.random.stateless_*.
    spec: see MaskingSpec.

  Returns:
    input_ids, input_mask, masked_positions, masked_ids, masked_weights (see the module
    docstring).
  """
  input_ids_BxT = tf.cast(input_ids_BxT, tf.int32)
  batch_size, seq_len = tf.shape(input_ids_BxT)[0], tf.shape(input_ids_BxT)[1]
  num_predictions = spec.max_predictions
  is_special_V = np.zeros(spec.vocab_size, bool)
  is_special_V[list(spec.special_ids)] = True
  normal_ids_N = np.flatnonzero(~is_special_V).astype(np.int32)
  select_seed, action_seed, random_id_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 3))

  input_mask_BxT = tf.not_equal(input_ids_BxT, spec.pad_id)
  is_candidate_BxT = tf.logical_and(tf.logical_not(tf.gather(is_special_V, input_ids_BxT)),
                                    input_mask_BxT)
  num_candidates_B = tf.reduce_sum(tf.cast(is_candidate_BxT, tf.int32), axis=-1)
  num_to_mask_B = tf.cast(tf.round(tf.cast(num_candidates_B, tf.float32) * spec.mask_prob),
                          tf.int32)
  num_to_mask_B = tf.minimum(tf.clip_by_value(num_to_mask_B, 1, num_predictions), num_candidates_B)

  # A uniform random subset of k candidates: the k candidates with the highest random scores.
  scores_BxT = tf.where(is_candidate_BxT,
                        tf.random.stateless_uniform([batch_size, seq_len], select_seed), -1.0)
  _, top_positions_BxP = tf.math.top_k(scores_BxT, k=num_predictions)
  is_real_BxP = tf.range(num_predictions)[None, :] < num_to_mask_B[:, None]
  # Ascending positions, as BERT writes them; unused slots sort last (seq_len), then become 0.
  positions_BxP = tf.sort(tf.where(is_real_BxP, top_positions_BxP, seq_len), axis=-1)
  positions_BxP = tf.where(is_real_BxP, positions_BxP, 0)
  original_ids_BxP = tf.gather(input_ids_BxT, positions_BxP, batch_dims=1)

  action_BxP = tf.random.stateless_uniform([batch_size, num_predictions], action_seed)
  to_mask_token_BxP = action_BxP < spec.mask_token_prob
  to_random_token_BxP = tf.logical_and(
      action_BxP >= spec.mask_token_prob,
      action_BxP < spec.mask_token_prob + spec.random_token_prob)
  random_ids_BxP = tf.gather(normal_ids_N, tf.random.stateless_uniform(
      [batch_size, num_predictions], random_id_seed, minval=0, maxval=len(normal_ids_N),
      dtype=tf.int32))
  new_ids_BxP = tf.where(to_mask_token_BxP, spec.mask_id,
                         tf.where(to_random_token_BxP, random_ids_BxP, original_ids_BxP))
  # Write the replacements as a sum of deltas: unused slots add 0 at position 0, so duplicate
  # indices are harmless.
  delta_BxP = tf.where(is_real_BxP, new_ids_BxP - original_ids_BxP, 0)
  batch_index_BxP = tf.broadcast_to(tf.range(batch_size)[:, None], [batch_size, num_predictions])
  indices_BxPx2 = tf.stack([batch_index_BxP, positions_BxP], axis=-1)
  masked_input_ids_BxT = input_ids_BxT + tf.scatter_nd(indices_BxPx2, delta_BxP,
                                                       [batch_size, seq_len])
  return {
      "input_ids": masked_input_ids_BxT,
      "input_mask": tf.cast(input_mask_BxT, tf.int32),
      "masked_positions": positions_BxP,
      "masked_ids": tf.where(is_real_BxP, original_ids_BxP, 0),
      "masked_weights": tf.cast(is_real_BxP, tf.float32),
  }


def parse_batch(serialized_B: tf.Tensor, seq_len: int) -> dict:
  """Serialized tf.train.Examples -> input_ids, segment_ids int32 [B, seq_len]."""
  features = {"input_ids": tf.io.FixedLenFeature([seq_len], tf.int64),
              "segment_ids": tf.io.FixedLenFeature([seq_len], tf.int64)}
  parsed = tf.io.parse_example(serialized_B, features)  # one op for the whole batch: fast
  return {k: tf.cast(v, tf.int32) for k, v in parsed.items()}


def _epoch_records(files: list[str], seed: int, shuffle_buffer: int):
  """A function epoch -> that epoch's shuffled serialized records; depends on (seed, epoch) only."""

  def records(epoch):
    epoch_seed = tf.stack([tf.constant(seed, tf.int64), epoch])
    file_seed, buffer_seed = tf.unstack(tf.random.experimental.stateless_split(epoch_seed, 2))
    shuffled_files = tf.random.experimental.stateless_shuffle(tf.constant(files), file_seed)
    ds = tf.data.Dataset.from_tensor_slices(shuffled_files).interleave(
        tf.data.TFRecordDataset, cycle_length=min(len(files), 16), block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    # An int64 drawn from (seed, epoch): each epoch its own, reproducible order.
    shuffle_seed = tf.random.stateless_uniform([], buffer_seed, minval=None, maxval=None,
                                               dtype=tf.int64)
    return ds.shuffle(max(shuffle_buffer, 1), seed=shuffle_seed, reshuffle_each_iteration=False)

  return records


def _epoch_seeds(seed: int, epoch):
  """(file_seed, order_seed) of an epoch: stateless, so any epoch's can be drawn on its own."""
  epoch_seed = tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)])
  return tf.unstack(tf.random.experimental.stateless_split(epoch_seed, 2))


def _file_order(num_files: int, seed: int, epoch) -> tf.Tensor:
  """The order the files are read in an epoch of data.order="windows"."""
  file_seed, _ = _epoch_seeds(seed, epoch)
  return tf.random.experimental.stateless_shuffle(tf.range(num_files), file_seed)


def _shuffled_windows(records: tf.data.Dataset, seed: int, epoch, first_window: int,
                      window: int) -> tf.data.Dataset:
  """Records permuted within consecutive windows of `window`, each window by its own seed
  (seed, epoch, window number): a window is shuffled the same wherever reading starts."""
  _, order_seed = _epoch_seeds(seed, epoch)

  def permute(number, block_W):
    block_seed = tf.random.experimental.stateless_fold_in(order_seed, number)
    order = tf.random.experimental.stateless_shuffle(tf.range(tf.shape(block_W)[0]), block_seed)
    return tf.gather(block_W, order)

  return records.batch(window).enumerate(start=first_window).map(permute).unbatch()


def _windowed_records(files: list[str], sizes: list[int], seed: int, window: int,
                      start_epoch: int, offset: int) -> tf.data.Dataset:
  """data.order="windows": each epoch reads the files whole, one after another, in an order
  drawn from (seed, epoch), and shuffles the records within windows of `window`. Starting at
  record `offset` of epoch `start_epoch` costs one file's record headers (TFRecordDataset
  skips a record by its length, without parsing it) and at most one window, whatever the step.
  """
  window = max(window, 1)
  order = [int(i) for i in _file_order(len(files), seed, start_epoch).numpy()]
  ordered_files, ordered_sizes = [files[i] for i in order], [sizes[i] for i in order]
  first_window = offset // window
  position = first_window * window  # where that window starts in the epoch's records
  first_file = 0
  while position >= ordered_sizes[first_file]:
    position -= ordered_sizes[first_file]
    first_file += 1
  records = tf.data.TFRecordDataset(ordered_files[first_file]).skip(position)
  if first_file + 1 < len(files):
    records = records.concatenate(tf.data.TFRecordDataset(ordered_files[first_file + 1:]))
  first = _shuffled_windows(records, seed, start_epoch, first_window, window).skip(
      offset - first_window * window)

  files_tensor = tf.constant(files)

  def epoch_records(epoch):
    epoch_files = tf.gather(files_tensor, _file_order(len(files), seed, epoch))
    return _shuffled_windows(tf.data.TFRecordDataset(epoch_files), seed, epoch, 0, window)

  return first.concatenate(tf.data.Dataset.range(start_epoch + 1, _EPOCHS).flat_map(
      epoch_records))


def _shard_files(data_dir: str, shards: list[dict]) -> list[str]:
  """The paths of metadata.json's `shards` entries; DataError if any is missing."""
  files = [fs.join(data_dir, s["file"]) for s in shards]
  missing = [f for f in files if not fs.exists(f)]
  if missing:
    raise DataError(f"Shards listed in {data_dir}/metadata.json are missing: {missing[:3]}. "
                    "Prepare the data again.")
  for shard, path in zip(shards, files):
    size = fs.getsize(path)
    if "bytes" in shard and size != shard["bytes"]:  # older preparations recorded no size
      raise DataError(
          f"The shard {path} has {size:,} bytes, but {shard['bytes']:,} were written "
          f"({shard['num_examples']:,} records; {data_dir}/metadata.json): it is damaged or "
          f"cut short. Prepare it again: delete it, its .json beside it and "
          f"{data_dir}/metadata.json, then start again (the whole shards are kept).")
  return files


def check_shards(data_dir: str, metadata: dict) -> None:
  """DataError naming the first shard (training or evaluation) that is missing or whose size
  differs from the one recorded when it was written; cheap (a stat per file), before training."""
  _shard_files(data_dir, metadata["shards"] + (prepared_folder.eval_split(metadata) or {}).get(
      "shards", []))


def damaged_record_error(error: Exception, data_dir: str) -> DataError | None:
  """A DataError for TFRecord's failed checksum or cut-off record (a shard damaged after its
  size was checked, e.g. bytes flipped in place); None for other errors."""
  if not isinstance(error, tf.errors.DataLossError):
    return None
  return DataError(f"A shard in {data_dir} is damaged ({' '.join(error.message.split())[:300]})."
                   f" Prepare the data again: delete {data_dir}/metadata.json and the damaged "
                   "shard with its .json beside it, then start again.")


def _deterministic(ds: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options)


def create_pretraining_dataset(config: ml_collections.ConfigDict, metadata: dict, data_dir: str,
                               start_step: int = 0, process_index: int = 0,
                               process_count: int = 1) -> tf.data.Dataset:
  """This host's endless, deterministic stream of masked batches (see the module docstring).

  Args:
    config: uses seed, seq_len, batch_size (global), mask.* and data.shuffle_buffer.
    metadata: of the prepared data (preparation.prepare / load_metadata).
    data_dir: the folder with the shards.
    start_step: the first batch is the one an uninterrupted run yields at this step.
    process_index, process_count: this host and the number of hosts (jax.process_*()).
  """
  prepared_folder.check_metadata_matches(config, metadata, data_dir=data_dir)
  if process_count < 1 or not 0 <= process_index < process_count:
    raise DataError(f"process_index={process_index} of process_count={process_count}.")
  problem = config_lib.batch_per_host_problem(config.batch_size, process_count)
  if problem:
    raise DataError(problem)
  per_host_batch = config.batch_size // process_count
  shards = metadata["shards"]
  if len(shards) < process_count:
    raise DataError(f"{data_dir} has {len(shards)} shards but there are {process_count} "
                    "processes, each of which needs its own: prepare it again with "
                    f"--config.data.num_shards={process_count} (or a multiple).")
  host_shards = shards[process_index::process_count]
  examples_per_epoch = sum(s["num_examples"] for s in host_shards)
  if examples_per_epoch == 0:
    raise DataError(f"Process {process_index}'s shards of {data_dir} are empty; add text or use "
                    "fewer shards.")
  problem = config_lib.max_predictions_problem(config)
  if problem:
    raise DataError(problem)
  files = _shard_files(data_dir, host_shards)
  if start_step < 0:
    raise DataError(f"start_step={start_step}")

  spec = MaskingSpec.from_config(config, metadata)
  seq_len = config.seq_len
  host_seed = tf.constant([config.seed, process_index], tf.int64)

  def masked_batch(step, serialized_B):
    batch = parse_batch(serialized_B, seq_len)
    seed = tf.random.experimental.stateless_fold_in(host_seed, step)
    masked = mask_batch(batch["input_ids"], seed, spec)
    masked["segment_ids"] = batch["segment_ids"]
    return masked

  # Resume without replaying: whole epochs are skipped by their number, the rest record by record
  # ("buffer": through the shuffle buffer, a cost that grows with the offset) or by seeking
  # ("windows": constant).
  start_epoch, offset = divmod(start_step * per_host_batch, examples_per_epoch)
  if config.data.order == "windows":
    ds = _windowed_records(files, [s["num_examples"] for s in host_shards], config.seed,
                           config.data.shuffle_buffer, start_epoch, offset)
  else:
    ds = tf.data.Dataset.range(start_epoch, _EPOCHS).flat_map(
        _epoch_records(files, config.seed, config.data.shuffle_buffer))
    ds = ds.skip(offset)
  ds = ds.batch(per_host_batch, drop_remainder=True)
  ds = ds.enumerate(start=start_step)  # the step numbers seed the masking
  ds = ds.map(masked_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = _deterministic(ds)
  return ds.prefetch(tf.data.AUTOTUNE)


def create_eval_dataset(config: ml_collections.ConfigDict, metadata: dict, data_dir: str,
                        process_index: int = 0, process_count: int = 1):
  """This host's part of the fixed evaluation batches, or None without an evaluation split.

  The first config.eval.max_sequences sequences of the held-out split (preparation.py), in file
  order, in global batches of config.batch_size (the last one filled with empty rows: no
  tokens, no predictions), each masked with a seed folded from (config.eval.seed, batch number):
  the same sequences, masks and batches at every evaluation, in every run, for any number of
  hosts. Each host keeps its rows [process_index * B / hosts, ...) of every global batch.
  """
  split = prepared_folder.eval_split(metadata)
  if split is None:
    return None
  prepared_folder.check_metadata_matches(config, metadata, data_dir=data_dir)
  problem = (config_lib.batch_per_host_problem(config.batch_size, process_count) or
             config_lib.max_predictions_problem(config))
  if problem:
    raise DataError(problem)
  files = _shard_files(data_dir, split["shards"])
  spec = MaskingSpec.from_config(config, metadata)
  global_batch, seq_len = config.batch_size, config.seq_len
  per_host = global_batch // process_count
  eval_seed = tf.constant([config.eval.seed, 0], tf.int64)

  def masked_batch(index, serialized):
    batch = parse_batch(serialized, seq_len)
    missing_rows = global_batch - tf.shape(serialized)[0]
    input_ids = tf.pad(batch["input_ids"], [[0, missing_rows], [0, 0]],
                       constant_values=spec.pad_id)
    masked = mask_batch(input_ids, tf.random.experimental.stateless_fold_in(eval_seed, index),
                        spec)
    masked["segment_ids"] = tf.pad(batch["segment_ids"], [[0, missing_rows], [0, 0]])
    rows = slice(process_index * per_host, (process_index + 1) * per_host)
    return {k: v[rows] for k, v in masked.items()}

  ds = tf.data.TFRecordDataset(files).take(config.eval.max_sequences)
  ds = ds.batch(global_batch).enumerate().map(masked_batch)
  return _deterministic(ds)
