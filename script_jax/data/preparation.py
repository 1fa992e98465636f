"""Raw text to packed, tokenized TFRecord shards plus metadata.json: `prepare` (the library behind
`python -m script_jax.data.prepare`) and the trainer's prepare-or-wait, `prepare_pretraining_data`.

Sequences are packed as in ELECTRA's build_pretraining_dataset.py (Clark et al., 2020): the lines
(sentences or paragraphs) of one document are accumulated up to a target length and laid out as
`[CLS] A [SEP] B [SEP]`, with segment ids 0 for `[CLS] A [SEP]` and 1 for `B [SEP]`, then [PAD].
Most sequences have two segments; 10% have one (as ELECTRA); a share config.data.short_seq_prob
gets a random shorter target length. Unlike ELECTRA, nothing is truncated away: a line that does
not fit is split and its rest starts the next sequence, so every token of the corpus is in exactly
one sequence.

Output folder:
  train-00000-of-00008.tfrecord ...  features input_ids, segment_ids: int64 [seq_len]
  train-00000-of-00008.tfrecord.json counts of a finished shard (and how it was made)
  eval-00000-of-00001.tfrecord       the held-out documents' sequences (data.eval_fraction)
  spm.model or vocab.txt             the tokenizer, copied or trained here
  metadata.json                      written last; what the trainer and the scorer read

A share data.eval_fraction of the documents (at least one; every 1/fraction-th in corpus
order, prepared_folder.is_held_out) is set aside whole: their sequences go to the evaluation shard
only, never to a training shard. Training examples go to shards round-robin, so shards differ by at most one
example. A rerun skips
finished shards whose recipe matches, writes the others to temporary names and renames them
when complete, so an interrupted run never leaves a half-written shard under a final name.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import secrets
import time
from typing import Optional

from absl import logging
import ml_collections
import numpy as np

from script_jax import config_lib
from script_jax import fs
from script_jax.data import corpus
from script_jax.data import packing
from script_jax.data import prepared_folder
from script_jax.data import tokenizers
from script_jax.data import writer
from script_jax.data.corpus import DataError

MIN_SEQ_LEN = 8


# ----------------------------------------------------------------------------------------------
# The tokenizer of a preparation.


def _read_sidecar(path: str) -> Optional[dict]:
  """A `.json` sidecar's contents; None when it is absent or damaged (the work is redone)."""
  try:
    return fs.read_json(path)
  except (OSError, ValueError):
    return None


def _copy_atomically(src: str, dst: str) -> None:
  """Copies src to dst unless dst already holds the same bytes (readers may have it open)."""
  if fs.exists(dst) and tokenizers.file_sha256(src) == tokenizers.file_sha256(dst):
    return
  tmp_path = f"{dst}.tmp-{os.getpid()}"
  fs.copy(src, tmp_path)
  fs.replace(tmp_path, dst)


def _make_tokenizer(config, output_dir: str, source_description: str,
                    read_lines) -> tokenizers.Tokenizer:
  """The tokenizer the config names, stored in output_dir (copied, reused, or trained)."""
  kind, model_type = prepared_folder.tokenizer_kind(config.data.tokenizer)
  vocab_file = config.data.vocab_file
  if kind == "wordpiece":
    if not vocab_file:
      raise DataError("config.data.tokenizer=wordpiece needs a vocab: pass "
                      "--config.data.vocab_file=PATH/vocab.txt (e.g. BERT uncased's), or use "
                      "--config.data.tokenizer=sentencepiece to train one on the corpus.")
    tokenizers.WordPieceTokenizer(vocab_file)  # checks it before copying it
    path = fs.join(output_dir, "vocab.txt")
    _copy_atomically(vocab_file, path)
    tokenizer = tokenizers.WordPieceTokenizer(path)
    tokenizer.info["source_path"] = fs.abspath(vocab_file)
  elif vocab_file:
    tokenizers.SentencePieceTokenizer(vocab_file)
    path = fs.join(output_dir, "spm.model")
    _copy_atomically(vocab_file, path)
    tokenizer = tokenizers.SentencePieceTokenizer(path)
    tokenizer.info["source_path"] = fs.abspath(vocab_file)
  else:
    path = fs.join(output_dir, "spm.model")
    recipe = {"source": source_description, "vocab_size": config.model.vocab_size,
              "model_type": model_type, "invalid_utf8": config.data.invalid_utf8}
    trained = _read_sidecar(path + ".json")
    if (trained and trained.get("recipe") == recipe and fs.exists(path) and
        trained.get("sha256") == tokenizers.file_sha256(path)):
      logging.info("Reusing the SentencePiece model %s.", path)
      tokenizer = tokenizers.SentencePieceTokenizer(path)
    else:
      start = time.time()
      logging.info("Training a %s SentencePiece model of %d pieces on %s (minutes for 100 MB "
                   "of text) ...", model_type, config.model.vocab_size, source_description)
      tokenizer = tokenizers.train_sentencepiece(
          read_lines(), config.model.vocab_size, path, model_type=model_type)
      logging.info("Trained %s in %.0f s.", path, time.time() - start)
      fs.write_json_atomically(path + ".json", {"recipe": recipe, "sha256": tokenizer.info["sha256"]})
    tokenizer.info["model_type"] = model_type
  tokenizer.info["filename"] = os.path.basename(path)
  problem = config_lib.vocab_size_problem(tokenizer.vocab_size, config, vocab_file or path)
  if problem:
    raise DataError(problem)
  return tokenizer


# ----------------------------------------------------------------------------------------------
# prepare().


def prepare(config: ml_collections.ConfigDict, output_dir: str, source: Optional[str] = None, *,
            num_workers: Optional[int] = None, tfds_data_dir: Optional[str] = None,
            tfds_manual_dir: Optional[str] = None) -> dict:
  """Prepares pretraining data in output_dir and returns its metadata (see the module docstring).

  Args:
    config: uses seq_len, batch_size, model.vocab_size and data.{source, tokenizer, vocab_file,
      num_shards, short_seq_prob, invalid_utf8}.
    output_dir: created if needed; a folder prepared before is reused if it matches the config,
      completed if it was interrupted, and refused (DataError) if it does not match.
    source: overrides config.data.source ("" = the embedded default corpus).
    num_workers: tokenizer processes (0 or 1: in this process; default: `default_num_workers`).
    tfds_data_dir, tfds_manual_dir: for "tfds:" sources, see corpus.read_documents.
  """
  start = time.time()
  source = config.data.source if source is None else source
  if config.seq_len < MIN_SEQ_LEN:
    raise DataError(f"config.seq_len={config.seq_len} is too short; use {MIN_SEQ_LEN} or more.")
  if config.data.num_shards < 1:
    raise DataError(f"config.data.num_shards={config.data.num_shards}; use 1 or more.")
  if not 0 <= config.data.eval_fraction < 1:
    raise DataError(f"config.data.eval_fraction={config.data.eval_fraction}; use a share of the "
                    "documents in [0, 1), e.g. 0.01 (0: no evaluation split).")
  if num_workers is None:
    num_workers = writer.default_num_workers(source)
  source_description = corpus.describe_source(source)
  fs.makedirs(output_dir)
  metadata_path = fs.join(output_dir, prepared_folder.METADATA_FILE)
  existing = prepared_folder.load_metadata(output_dir)
  if existing is not None:
    prepared_folder.check_metadata_matches(config, existing, source_description,
                                           data_dir=output_dir)

  def read(stats=None):
    return corpus.read_documents(source, config.data.invalid_utf8, stats,
                                 tfds_data_dir=tfds_data_dir, tfds_manual_dir=tfds_manual_dir)

  tokenizer = _make_tokenizer(config, output_dir, source_description,
                              lambda: (line for document in read() for line in document))
  recipe = {"format_version": prepared_folder.FORMAT_VERSION, "source": source_description,
            "tokenizer_sha256": tokenizer.info["sha256"], "seq_len": config.seq_len,
            "num_shards": config.data.num_shards, "short_seq_prob": config.data.short_seq_prob,
            "single_segment_prob": packing.SINGLE_SEGMENT_PROB, "packing_seed": packing.PACKING_SEED,
            "invalid_utf8": config.data.invalid_utf8, "eval_fraction": config.data.eval_fraction}
  fingerprint = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
  num_shards = config.data.num_shards
  names = prepared_folder.shard_filenames(num_shards, config.data.eval_fraction)
  if (existing is not None and existing.get("fingerprint") == fingerprint and
      all(fs.exists(fs.join(output_dir, n)) for n in names)):
    logging.info("%s is up to date (%d sequences); nothing to do.", output_dir,
                 existing["num_examples"])
    return existing

  if existing is not None:
    # Readers wait for a matching metadata.json: take the stale one away before changing shards.
    fs.remove(metadata_path)
  # Temporary files of an interrupted run (one preparation per folder at a time).
  for path in fs.glob(fs.join(output_dir, "*.tmp-*")):
    fs.remove(path)
  sidecars = [_read_sidecar(fs.join(output_dir, n + ".json")) for n in names]
  todo = [k for k, s in enumerate(sidecars) if not (
      s and s.get("recipe") == recipe and fs.exists(fs.join(output_dir, names[k])))]
  if todo:
    logging.info("Preparing %d of %d shards in %s from %s with %d worker process(es).",
                 len(todo), len(names), output_dir, source_description, max(num_workers, 1))
    stats = corpus.ReadStats()
    shards = writer.write_shards(config, output_dir, todo, read(stats), stats, tokenizer, num_workers,
                           recipe)
    corpus_summary = stats.summary()
  else:
    logging.info("All %d shards in %s are finished; writing %s.", len(names), output_dir,
                 prepared_folder.METADATA_FILE)
    shards = [{k: s[k] for k in ("file", "num_examples", "num_tokens", "bytes") if k in s}
              for s in sidecars]
    corpus_summary = sidecars[0]["corpus"]

  # Shards of an earlier preparation with another number of shards.
  for path in (fs.glob(fs.join(output_dir, "train-*-of-*.tfrecord*")) +
               fs.glob(fs.join(output_dir, "eval-*-of-*.tfrecord*"))):
    if os.path.basename(path).split(".tfrecord")[0] + ".tfrecord" not in names:
      fs.remove(path)
  output_bytes = sum(fs.getsize(fs.join(output_dir, n)) for n in fs.listdir(output_dir))
  shards, eval_shards = shards[:num_shards], shards[num_shards:]
  num_examples = sum(s["num_examples"] for s in shards)
  num_tokens = sum(s["num_tokens"] for s in shards)
  num_documents = corpus_summary["documents"]
  eval_split = {
      "fraction": config.data.eval_fraction,
      # Σ_i [ceil((i+1)f) > ceil(if)] telescopes to ceil(Nf) for f <= 1.
      "num_documents": math.ceil(num_documents * config.data.eval_fraction),
      "num_examples": sum(s["num_examples"] for s in eval_shards),
      "num_tokens": sum(s["num_tokens"] for s in eval_shards),
      "shards": eval_shards,
  }
  metadata = {
      "format_version": prepared_folder.FORMAT_VERSION,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "source": source_description,
      "seq_len": config.seq_len,
      "vocab_size": tokenizer.vocab_size,
      "tokenizer": tokenizer.info,
      "special_ids": tokenizer.special_ids,
      "num_examples": num_examples,
      "num_tokens": num_tokens,
      "padding_fraction": 1.0 - (num_tokens + num_examples * 2) / (num_examples * config.seq_len),
      "shards": shards,  # training
      "eval": eval_split,  # held-out documents, never trained on (prepared_folder.eval_split)
      "skipped_lines": corpus_summary["skipped_lines"],
      "corpus": corpus_summary,
      "recipe": recipe,
      "fingerprint": fingerprint,
      "wall_time_s": round(time.time() - start, 1),
      "output_bytes": output_bytes,
  }
  fs.write_json_atomically(metadata_path, metadata)  # last: its presence means "complete"
  logging.info("Wrote %s", metadata_path)
  return metadata


# ----------------------------------------------------------------------------------------------
# For the trainer.


def _jax_processes() -> tuple[int, int]:
  try:
    import jax  # pylint: disable=g-import-not-at-top  (heavy: jax; spawned writer workers re-import this module)
  except ImportError:
    return 0, 1
  return jax.process_index(), jax.process_count()


def prepare_pretraining_data(config: ml_collections.ConfigDict, workdir: str, *,
                             process_index: Optional[int] = None,
                             process_count: Optional[int] = None,
                             poll_s: float = 10.0, timeout_s: float = 48 * 3600) -> dict:
  """The trainer's entry point: prepared data for the config, preparing it on first use.

  The data folder is config.data.prepared_dir, or WORKDIR/data. A folder with a metadata.json
  that fits the config is used as it is (see `_reusable_metadata`). Otherwise process 0 prepares
  it (from config.data.source; the embedded default corpus when that is empty), finishing an
  interrupted preparation, and the other processes wait for its metadata.json, which must then
  be on a filesystem they share: a gs:// folder, or a local path that every host mounts (checked
  at once, see `_check_shared_with_process_0`). Returns the metadata (see `prepare`).

  Args:
    config: the training config.
    workdir: the training run's folder.
    process_index, process_count: default to jax.process_index() and jax.process_count().
    poll_s, timeout_s: how often, and how long, processes other than 0 look for metadata.json.
  """
  data_dir = prepared_folder.data_dir_of(config, workdir)
  if process_index is None or process_count is None:
    process_index, process_count = _jax_processes()
  metadata = _reusable_metadata(config, data_dir)
  if process_count > 1 and _jax_processes()[1] == process_count and not fs.is_remote(data_dir):
    # A local path may name a different disk on each host: then the processes would wait for a
    # metadata.json that never appears on theirs. Every host must see process 0's files.
    if not all(_all_processes(metadata is not None)):
      _check_shared_with_process_0(data_dir, process_index)
  if metadata is not None:
    return metadata
  if process_index == 0:
    return prepare(config, data_dir)
  deadline = time.time() + timeout_s
  while metadata is None:
    if time.time() > deadline:
      raise DataError(f"Process {process_index} waited {timeout_s:.0f} s for process 0 to "
                      f"prepare {data_dir}; see process 0's log.")
    logging.log_every_n_seconds(logging.INFO, "Process %d waits for %s from process 0 ...", 60,
                                process_index, fs.join(data_dir, prepared_folder.METADATA_FILE))
    time.sleep(poll_s)
    metadata = _reusable_metadata(config, data_dir)
  return metadata


def _all_processes(value: bool) -> list[bool]:
  """`value` of every JAX process, in process order (a collective: every process calls it)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top  (heavy: jax; spawned writer workers re-import this module)
  return [bool(v) for v in multihost_utils.process_allgather(np.array(value, np.int32))]


def _check_shared_with_process_0(data_dir: str, process_index: int) -> None:
  """Raises DataError on every process unless each sees a file process 0 writes in data_dir.

  Process 0 writes `.visible-<nonce>` (the nonce broadcast from process 0, so an old marker never
  counts), all processes meet at a barrier, look for it, and share what they found: all of them
  fail at once, with the same message, instead of waiting for data that is not on their disk.
  """
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top  (heavy: jax; spawned writer workers re-import this module)
  nonce = int(multihost_utils.broadcast_one_to_all(np.array(secrets.randbits(31), np.int32)))
  marker = fs.join(data_dir, f".visible-{nonce}")
  if process_index == 0:
    fs.makedirs(data_dir)
    fs.write_atomically(marker, "written by process 0 to check that every host sees this folder\n")
  multihost_utils.sync_global_devices(f"script_jax prepared-data marker {nonce}")
  visible = _all_processes(fs.exists(marker))
  multihost_utils.sync_global_devices(f"script_jax prepared-data checked {nonce}")
  if process_index == 0:
    fs.remove(marker)
  blind = [i for i, v in enumerate(visible) if not v]
  if blind:
    raise DataError(
        f"The prepared-data folder {data_dir} is on a disk that process(es) {blind} do not "
        "share with process 0: they cannot see the files process 0 writes there. Use a gs:// "
        "folder (--config.data.prepared_dir=gs://BUCKET/data, or a gs:// --workdir) or a disk "
        "that every host mounts at the same path.")


def _reusable_metadata(config: ml_collections.ConfigDict, data_dir: str) -> Optional[dict]:
  """The folder's metadata if the trainer can use it as it is, else None.

  An explicit config.data.prepared_dir is used whatever it was prepared from, as long as the
  model fits it (seq_len, vocab, tokenizer); WORKDIR/data must also come from config.data.source.
  """
  metadata = prepared_folder.load_metadata(data_dir)
  if metadata is None:
    return None
  source_description = corpus.describe_source(config.data.source)
  try:
    prepared_folder.check_metadata_matches(config, metadata, data_dir=data_dir)
  except DataError:
    return None  # prepare() says what is wrong (or process 0 is about to replace it)
  if not config.data.prepared_dir and metadata.get("source") != source_description:
    return None
  return metadata
