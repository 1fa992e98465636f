"""The parallel shard writer: tokenize and pack the corpus in worker processes, write TFRecords.

Examples go to shards round-robin, so shards differ by at most one example. Shards are written to
temporary names and renamed when complete, so an interrupted run never leaves a half-written shard
under a final name.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import random
import time
from typing import Iterator

from absl import logging
import numpy as np

from script_jax import fs
from script_jax.data import corpus
from script_jax.data import packing
from script_jax.data import prepared_folder
from script_jax.data import tokenizers
from script_jax.data.corpus import DataError

_CHUNK_LINES = 2048  # lines per task sent to a worker process
_SMALL_SOURCE_BYTES = 32 * 2**20  # text files smaller than this are tokenized in-process
_LOG_EVERY_S = 10.0


_worker_state = {}


def _init_worker(tokenizer_info: dict, seq_len: int, short_seq_prob: float, in_process: bool,
                 eval_fraction: float = 0.0):
  if not in_process:
    # One core per worker process: no extra threads inside the tokenizer libraries.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
  _worker_state.update(
      tokenizer=tokenizers.load_tokenizer(tokenizer_info, num_threads=-1 if in_process else 1),
      seq_len=seq_len, short_seq_prob=short_seq_prob, eval_fraction=eval_fraction)


def _encode_and_pack(task: tuple[int, list[corpus.Document]]):
  """(first document index, documents) -> input_ids, segment_ids [n, T], tokens per row, and
  whether each row's document is held out for evaluation (prepared_folder.is_held_out)."""
  first_index, documents = task
  tokenizer, seq_len = _worker_state["tokenizer"], _worker_state["seq_len"]
  ids_per_line = tokenizer.encode_batch([line for document in documents for line in document])
  pairs, held_out, start = [], [], 0
  for i, document in enumerate(documents):
    # One generator per document, seeded by its index: the packing does not depend on how
    # documents are split into tasks or on the number of worker processes.
    rng = random.Random(f"{packing.PACKING_SEED}/{first_index + i}")
    lines = ids_per_line[start:start + len(document)]
    start += len(document)
    document_pairs = packing.pack_document(lines, seq_len, rng, _worker_state["short_seq_prob"])
    pairs += document_pairs
    held_out += [prepared_folder.is_held_out(first_index + i, _worker_state["eval_fraction"])
                 ] * len(document_pairs)
  input_ids, segment_ids = packing.pairs_to_arrays(pairs, seq_len, tokenizer.special_ids)
  tokens = np.array([len(a) + len(b) for a, b in pairs], np.int64)
  return input_ids, segment_ids, tokens, np.array(held_out, bool)


def _tasks(documents: Iterator[corpus.Document]) -> Iterator[tuple[int, list[corpus.Document]]]:
  batch, lines, first = [], 0, 0
  for document in documents:
    batch.append(document)
    lines += len(document)
    if lines >= _CHUNK_LINES:
      yield first, batch
      first += len(batch)
      batch, lines = [], 0
  if batch:
    yield first, batch


def _ordered_map(pool, fn, tasks, max_in_flight: int):
  """pool.imap with a bound on queued tasks: imap would read the whole corpus into memory."""
  in_flight = collections.deque()
  for task in tasks:
    in_flight.append(pool.apply_async(fn, (task,)))
    if len(in_flight) >= max_in_flight:
      yield in_flight.popleft().get()
  while in_flight:
    yield in_flight.popleft().get()


class _Progress:
  """Logs counts, rate and ETA every few seconds."""

  def __init__(self, stats: corpus.ReadStats):
    self._stats, self._start, self._last = stats, time.time(), 0.0

  def update(self, examples: int, tokens: int, force: bool = False) -> None:
    now = time.time()
    if not force and now - self._last < _LOG_EVERY_S:
      return
    self._last, elapsed = now, now - self._start
    fraction = self._stats.progress()
    eta = (f", {fraction:.0%} read, ETA {elapsed / fraction - elapsed:.0f} s"
           if fraction else "")
    logging.info("%d documents, %d lines -> %d sequences, %d tokens (%.0f tokens/s)%s",
                 self._stats.documents, self._stats.lines, examples, tokens,
                 tokens / max(elapsed, 1e-9), eta)


def _serialize_fn():
  # TF is imported here, not at the top, so that worker processes (which import this module)
  # start without loading TensorFlow.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (heavy: tensorflow)

  def serialize(input_ids_T, segment_ids_T) -> bytes:
    feature = {
        "input_ids": tf.train.Feature(int64_list=tf.train.Int64List(value=input_ids_T.tolist())),
        "segment_ids": tf.train.Feature(
            int64_list=tf.train.Int64List(value=segment_ids_T.tolist())),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()

  return serialize, tf.io.TFRecordWriter


def write_shards(config, output_dir: str, todo: list[int], documents, stats, tokenizer,
                  num_workers: int, recipe: dict) -> list[dict]:
  """Tokenizes and packs the corpus, writes the shards in `todo`; returns every shard's counts.

  Shard k < num_shards is a training shard; with data.eval_fraction > 0, shard num_shards is the
  evaluation shard, which takes every sequence of the held-out documents (in corpus order).
  """
  serialize, writer_cls = _serialize_fn()
  num_shards = config.data.num_shards
  names = prepared_folder.shard_filenames(num_shards, config.data.eval_fraction)
  tmp_paths = {k: fs.join(output_dir, f"{names[k]}.tmp-{os.getpid()}") for k in todo}
  writers = {k: writer_cls(tmp_paths[k]) for k in todo}
  counts = np.zeros(len(names), np.int64)
  tokens = np.zeros(len(names), np.int64)
  init_args = (tokenizer.info, config.seq_len, config.data.short_seq_prob, num_workers <= 1,
               config.data.eval_fraction)
  progress = _Progress(stats)
  pool = None
  try:
    if num_workers <= 1:
      _init_worker(*init_args)
      results = map(_encode_and_pack, _tasks(documents))
    else:
      # "spawn": the parent has TensorFlow's threads running, which fork() would not carry over.
      pool = multiprocessing.get_context("spawn").Pool(
          num_workers, initializer=_init_worker, initargs=init_args)
      results = _ordered_map(pool, _encode_and_pack, _tasks(documents), 4 * num_workers)
    train_index = 0
    for input_ids_NxT, segment_ids_NxT, tokens_N, held_out_N in results:
      for row in range(len(tokens_N)):
        if held_out_N[row]:
          shard = num_shards
        else:
          shard = train_index % num_shards
          train_index += 1
        if shard in writers:
          writers[shard].write(serialize(input_ids_NxT[row], segment_ids_NxT[row]))
        counts[shard] += 1
        tokens[shard] += tokens_N[row]
      progress.update(int(counts.sum()), int(tokens.sum()))
    progress.update(int(counts.sum()), int(tokens.sum()), force=True)
    for writer in writers.values():
      writer.close()
    if counts[:num_shards].sum() == 0 and counts[num_shards:].sum() > 0:
      raise DataError(
          f"All {stats.documents} document(s) of the source went to the evaluation split "
          f"(data.eval_fraction={config.data.eval_fraction} holds out at least one document), "
          "so nothing is left to train on. Separate the documents of a text source with blank "
          "lines, add text, or set --config.data.eval_fraction=0 (no held-out metrics).")
    if counts[:num_shards].sum() < config.batch_size:
      raise DataError(
          f"Only {counts[:num_shards].sum()} training sequences of {config.seq_len} tokens "
          f"({tokens[:num_shards].sum()} tokens, {stats.documents} documents, "
          f"{counts[num_shards:].sum()} sequences held out), fewer than one global batch of "
          f"config.batch_size={config.batch_size}. Add text to the source, or lower "
          "--config.batch_size, --config.seq_len or --config.data.eval_fraction.")
    shards = []
    for k in range(len(names)):
      shard = {"file": names[k], "num_examples": int(counts[k]), "num_tokens": int(tokens[k])}
      final_path = fs.join(output_dir, names[k])
      if k in todo:
        fs.replace(tmp_paths[k], final_path)
      shard["bytes"] = fs.getsize(final_path)  # the reader checks it (pipeline.check_shards)
      if k in todo:
        # The sidecar is written after the shard, so it exists only for a complete shard.
        fs.write_json_atomically(final_path + ".json",
                                  {**shard, "recipe": recipe, "corpus": stats.summary()})
      shards.append(shard)
    return shards
  finally:
    if pool is not None:
      pool.terminate()  # after an error too: no orphaned workers
    for k, path in tmp_paths.items():
      if fs.exists(path):  # not renamed: this preparation failed
        writers[k].close()
        fs.remove(path)


def default_num_workers(source: str) -> int:
  """Tokenizer processes for a source: one per core, except for small sources.

  Small sources are tokenized in this process (the tokenizer libraries use the cores by
  themselves): spawning workers costs seconds, more than a few MB of text take.
  """
  if not source:
    return 1
  if not source.startswith("tfds:"):
    total_bytes = sum(fs.getsize(f) for f in corpus.list_text_files(source))
    if total_bytes < _SMALL_SOURCE_BYTES:
      return 1
  return os.cpu_count() or 1
