"""Raw text to packed, tokenized TFRecord shards plus metadata.json.

  python -m script_jax.prepare_data --config=configs/tiny.py --output_dir=/tmp/tiny_data
  python -m script_jax.prepare_data --config=configs/small.py --output_dir=/tmp/wiki \
      --source=/path/to/wiki.txt.gz --config.data.vocab_file=/path/to/bert/vocab.txt

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
  spm.model or vocab.txt             the tokenizer, copied or trained here
  metadata.json                      written last; what the trainer and the scorer read

Examples go to shards round-robin, so shards differ by at most one example. A rerun skips
finished shards whose recipe matches, writes the others to temporary names and renames them
when complete, so an interrupted run never leaves a half-written shard under a final name.
"""

from __future__ import annotations

import collections
import datetime
import glob
import hashlib
import json
import multiprocessing
import os
import random
import shutil
import time
from typing import Iterable, Iterator, Optional

from absl import logging
import ml_collections
import numpy as np

from script_jax import corpus
from script_jax import tokenizers_lib
from script_jax.corpus import DataError

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
SINGLE_SEGMENT_PROB = 0.1  # ELECTRA's share of one-segment sequences (like classification inputs)
PACKING_SEED = 0  # packing does not follow config.seed: other training seeds reuse the data
MIN_SEQ_LEN = 8
_CHUNK_LINES = 2048  # lines per task sent to a worker process
_SMALL_SOURCE_BYTES = 32 * 2**20  # text files smaller than this are tokenized in-process
_LOG_EVERY_S = 10.0


# ----------------------------------------------------------------------------------------------
# Packing (pure functions).


def _take(pending: collections.deque, n: int) -> list[list[int]]:
  """Removes the first n tokens of `pending` (a deque of lines), splitting the last line."""
  pieces = []
  while n > 0:
    line = pending.popleft()
    if len(line) > n:
      pending.appendleft(line[n:])  # the rest of the line starts the next sequence
      line = line[:n]
    pieces.append(line)
    n -= len(line)
  return pieces


def _split_segments(pieces: list[list[int]], budget: int,
                    rng: random.Random) -> tuple[list[int], list[int]]:
  """ELECTRA's rule for dividing a sequence's lines between segments A and B."""
  first_target = budget // 2
  first, second = [], []
  for piece in pieces:
    # A line joins A when A is empty, when it fits A's target, or, half the time, when it
    # would overflow a not-yet-full A. Lines stay in order (ELECTRA may move a late short line
    # into A; we do not).
    if not second and (not first or len(first) + len(piece) < first_target or
                       (len(first) < first_target and rng.random() < 0.5)):
      first += piece
    else:
      second += piece
  if not second and len(first) > first_target:
    # One long line: split it, or paragraph-per-line corpora would be mostly one segment.
    first, second = first[:first_target], first[first_target:]
  return first, second


def pack_document(lines: Iterable[list[int]], seq_len: int, rng: random.Random,
                  short_seq_prob: float) -> list[tuple[list[int], list[int]]]:
  """Packs one document's tokenized lines into (segment A, segment B) pairs.

  Each pair fits `[CLS] A [SEP] B [SEP]` (or `[CLS] A [SEP]` when B is empty) in seq_len.
  Every token of `lines` lands in exactly one pair, in order.
  """
  pairs = []
  pending = collections.deque()
  pending_len = 0
  target = seq_len

  def make_pair():
    nonlocal pending_len, target
    two_segments = rng.random() >= SINGLE_SEGMENT_PROB
    budget = target - (3 if two_segments else 2)
    n = min(pending_len, budget)
    pieces = _take(pending, n)
    pending_len -= n
    if two_segments:
      pairs.append(_split_segments(pieces, budget, rng))
    else:
      pairs.append(([t for p in pieces for t in p], []))
    # ELECTRA: a small share of sequences get a random shorter target length.
    target = rng.randint(5, seq_len) if rng.random() < short_seq_prob else seq_len

  for line in lines:
    if not line:
      continue
    pending.append(list(line))
    pending_len += len(line)
    while pending_len >= target - 2:  # enough for a sequence, whatever its segment count
      make_pair()
  if pending_len:  # the document's end closes its last, shorter sequence
    make_pair()
  return pairs


def pairs_to_arrays(pairs: list[tuple[list[int], list[int]]], seq_len: int,
                    special_ids: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
  """Lays out (A, B) pairs as input_ids and segment_ids, int32 [n, seq_len]."""
  cls_id, sep_id, pad_id = special_ids["cls"], special_ids["sep"], special_ids["pad"]
  input_ids_NxT = np.full((len(pairs), seq_len), pad_id, np.int32)
  segment_ids_NxT = np.zeros((len(pairs), seq_len), np.int32)
  for i, (first, second) in enumerate(pairs):
    ids = [cls_id, *first, sep_id]
    len_a = len(ids)
    if second:
      ids += [*second, sep_id]
    if len(ids) > seq_len:
      raise AssertionError(f"packed {len(ids)} tokens into {seq_len}")
    input_ids_NxT[i, :len(ids)] = ids
    segment_ids_NxT[i, len_a:len(ids)] = 1
  return input_ids_NxT, segment_ids_NxT


# ----------------------------------------------------------------------------------------------
# Tokenize + pack, in worker processes.

_worker_state = {}


def _init_worker(tokenizer_info: dict, seq_len: int, short_seq_prob: float, in_process: bool):
  if not in_process:
    # One core per worker process: no extra threads inside the tokenizer libraries.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
  _worker_state.update(
      tokenizer=tokenizers_lib.load_tokenizer(tokenizer_info, num_threads=-1 if in_process else 1),
      seq_len=seq_len, short_seq_prob=short_seq_prob)


def _encode_and_pack(task: tuple[int, list[corpus.Document]]):
  """(first document index, documents) -> input_ids, segment_ids [n, T] and tokens per row."""
  first_index, documents = task
  tokenizer, seq_len = _worker_state["tokenizer"], _worker_state["seq_len"]
  ids_per_line = tokenizer.encode_batch([line for document in documents for line in document])
  pairs, start = [], 0
  for i, document in enumerate(documents):
    # One generator per document, seeded by its index: the packing does not depend on how
    # documents are split into tasks or on the number of worker processes.
    rng = random.Random(f"{PACKING_SEED}/{first_index + i}")
    lines = ids_per_line[start:start + len(document)]
    start += len(document)
    pairs += pack_document(lines, seq_len, rng, _worker_state["short_seq_prob"])
  input_ids, segment_ids = pairs_to_arrays(pairs, seq_len, tokenizer.special_ids)
  tokens = np.array([len(a) + len(b) for a, b in pairs], np.int64)
  return input_ids, segment_ids, tokens


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


# ----------------------------------------------------------------------------------------------
# Metadata and checks.


def tokenizer_kind(name: str) -> tuple[str, Optional[str]]:
  """config.data.tokenizer -> (kind, SentencePiece model type or None)."""
  if name in ("sentencepiece", "sentencepiece_unigram"):
    return "sentencepiece", "unigram"
  if name == "sentencepiece_bpe":
    return "sentencepiece", "bpe"
  if name == "wordpiece":
    return "wordpiece", None
  raise DataError(f"config.data.tokenizer={name!r}; use 'sentencepiece' (unigram), "
                  "'sentencepiece_bpe' or 'wordpiece'.")


def load_metadata(data_dir: str) -> Optional[dict]:
  """metadata.json of a prepared folder (None when there is none), tokenizer path made absolute.

  The path is re-pointed into `data_dir`, so a moved or copied folder still works.
  """
  path = os.path.join(data_dir, METADATA_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      metadata = json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(f"{path} is unreadable ({e}); delete it and prepare the data again.") from e
  tokenizer_info = metadata.get("tokenizer", {})
  if tokenizer_info.get("filename"):
    tokenizer_info["path"] = os.path.abspath(os.path.join(data_dir, tokenizer_info["filename"]))
  return metadata


def check_metadata_matches(config: ml_collections.ConfigDict, metadata: dict,
                           source_description: Optional[str] = None,
                           data_dir: str = "the data folder") -> None:
  """Raises DataError when prepared data does not fit the config.

  Reading (input_pipeline.py) needs the same seq_len, vocab_size and tokenizer type (and the same
  vocab as config.data.vocab_file, when that file is here). Preparing into an existing folder
  (`source_description` given) also needs the same source and the same kind of vocab.
  """
  kind, _ = tokenizer_kind(config.data.tokenizer)
  differences = []
  if metadata.get("format_version") != FORMAT_VERSION:
    differences.append(f"format version {metadata.get('format_version')}, not {FORMAT_VERSION}")
  if metadata.get("seq_len") != config.seq_len:
    differences.append(f"seq_len {metadata.get('seq_len')}, not config.seq_len={config.seq_len}")
  if metadata.get("vocab_size") != config.model.vocab_size:
    differences.append(f"vocab_size {metadata.get('vocab_size')}, not "
                       f"config.model.vocab_size={config.model.vocab_size}")
  prepared_kind = metadata.get("tokenizer", {}).get("type")
  if prepared_kind != kind:
    differences.append(f"tokenizer {prepared_kind!r}, not config.data.tokenizer={kind!r}")
  vocab_file = config.data.vocab_file
  if vocab_file and os.path.isfile(vocab_file):
    prepared_sha = metadata.get("tokenizer", {}).get("sha256")
    if prepared_sha != tokenizers_lib.file_sha256(vocab_file):
      differences.append(f"another vocab than config.data.vocab_file={vocab_file}")
  if source_description is not None:  # preparing (not only reading): the recipe must match too
    if not vocab_file and metadata.get("tokenizer", {}).get("source_path"):
      differences.append(f"the given vocab {metadata['tokenizer']['source_path']}, not one "
                         "trained on the corpus (config.data.vocab_file is empty)")
    if metadata.get("source") != source_description:
      differences.append(f"source {metadata.get('source')!r}, not {source_description!r}")
  if differences:
    raise DataError(f"{data_dir} was prepared with " + "; ".join(differences) + ". Use another "
                    "output/prepared folder (--output_dir, --config.data.prepared_dir), delete "
                    "this one, or change the config to match.")


def _write_json_atomically(path: str, value: dict) -> None:
  tmp_path = f"{path}.tmp-{os.getpid()}"
  with open(tmp_path, "w") as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp_path, path)


def _read_json(path: str) -> Optional[dict]:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def shard_filename(index: int, num_shards: int) -> str:
  return f"train-{index:05d}-of-{num_shards:05d}.tfrecord"


# ----------------------------------------------------------------------------------------------
# The tokenizer of a preparation.


def _copy_atomically(src: str, dst: str) -> None:
  """Copies src to dst unless dst already holds the same bytes (readers may have it open)."""
  if os.path.exists(dst) and tokenizers_lib.file_sha256(src) == tokenizers_lib.file_sha256(dst):
    return
  tmp_path = f"{dst}.tmp-{os.getpid()}"
  shutil.copyfile(src, tmp_path)
  os.replace(tmp_path, dst)


def _make_tokenizer(config, output_dir: str, source_description: str,
                    read_lines) -> tokenizers_lib.Tokenizer:
  """The tokenizer the config names, stored in output_dir (copied, reused, or trained)."""
  kind, model_type = tokenizer_kind(config.data.tokenizer)
  vocab_file = config.data.vocab_file
  if kind == "wordpiece":
    if not vocab_file:
      raise DataError("config.data.tokenizer=wordpiece needs a vocab: pass "
                      "--config.data.vocab_file=PATH/vocab.txt (e.g. BERT uncased's), or use "
                      "--config.data.tokenizer=sentencepiece to train one on the corpus.")
    tokenizers_lib.WordPieceTokenizer(vocab_file)  # checks it before copying it
    path = os.path.join(output_dir, "vocab.txt")
    _copy_atomically(vocab_file, path)
    tokenizer = tokenizers_lib.WordPieceTokenizer(path)
    tokenizer.info["source_path"] = os.path.abspath(vocab_file)
  elif vocab_file:
    tokenizers_lib.SentencePieceTokenizer(vocab_file)
    path = os.path.join(output_dir, "spm.model")
    _copy_atomically(vocab_file, path)
    tokenizer = tokenizers_lib.SentencePieceTokenizer(path)
    tokenizer.info["source_path"] = os.path.abspath(vocab_file)
  else:
    path = os.path.join(output_dir, "spm.model")
    recipe = {"source": source_description, "vocab_size": config.model.vocab_size,
              "model_type": model_type, "invalid_utf8": config.data.invalid_utf8}
    trained = _read_json(path + ".json")
    if (trained and trained.get("recipe") == recipe and os.path.exists(path) and
        trained.get("sha256") == tokenizers_lib.file_sha256(path)):
      logging.info("Reusing the SentencePiece model %s.", path)
      tokenizer = tokenizers_lib.SentencePieceTokenizer(path)
    else:
      start = time.time()
      logging.info("Training a %s SentencePiece model of %d pieces on %s (minutes for 100 MB "
                   "of text) ...", model_type, config.model.vocab_size, source_description)
      tokenizer = tokenizers_lib.train_sentencepiece(
          read_lines(), config.model.vocab_size, path, model_type=model_type)
      logging.info("Trained %s in %.0f s.", path, time.time() - start)
      _write_json_atomically(path + ".json", {"recipe": recipe, "sha256": tokenizer.info["sha256"]})
    tokenizer.info["model_type"] = model_type
  tokenizer.info["filename"] = os.path.basename(path)
  if tokenizer.vocab_size != config.model.vocab_size:
    raise DataError(f"The tokenizer {vocab_file or path} has {tokenizer.vocab_size} entries but "
                    f"config.model.vocab_size={config.model.vocab_size}; set "
                    f"--config.model.vocab_size={tokenizer.vocab_size}.")
  return tokenizer


# ----------------------------------------------------------------------------------------------
# prepare().


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
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def serialize(input_ids_T, segment_ids_T) -> bytes:
    feature = {
        "input_ids": tf.train.Feature(int64_list=tf.train.Int64List(value=input_ids_T.tolist())),
        "segment_ids": tf.train.Feature(
            int64_list=tf.train.Int64List(value=segment_ids_T.tolist())),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()

  return serialize, tf.io.TFRecordWriter


def _write_shards(config, output_dir: str, todo: list[int], documents, stats, tokenizer,
                  num_workers: int, recipe: dict) -> list[dict]:
  """Tokenizes and packs the corpus, writes the shards in `todo`; returns every shard's counts."""
  serialize, writer_cls = _serialize_fn()
  num_shards = config.data.num_shards
  names = [shard_filename(k, num_shards) for k in range(num_shards)]
  tmp_paths = {k: os.path.join(output_dir, f"{names[k]}.tmp-{os.getpid()}") for k in todo}
  writers = {k: writer_cls(tmp_paths[k]) for k in todo}
  counts = np.zeros(num_shards, np.int64)
  tokens = np.zeros(num_shards, np.int64)
  init_args = (tokenizer.info, config.seq_len, config.data.short_seq_prob, num_workers <= 1)
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
    example_index = 0
    for input_ids_NxT, segment_ids_NxT, tokens_N in results:
      for row in range(len(tokens_N)):
        shard = example_index % num_shards
        if shard in writers:
          writers[shard].write(serialize(input_ids_NxT[row], segment_ids_NxT[row]))
        counts[shard] += 1
        tokens[shard] += tokens_N[row]
        example_index += 1
      progress.update(int(counts.sum()), int(tokens.sum()))
    progress.update(int(counts.sum()), int(tokens.sum()), force=True)
    for writer in writers.values():
      writer.close()
    if counts.sum() < config.batch_size:
      raise DataError(
          f"Only {counts.sum()} sequences of {config.seq_len} tokens ({tokens.sum()} tokens, "
          f"{stats.documents} documents), fewer than one global batch of "
          f"config.batch_size={config.batch_size}. Add text to the source, or lower "
          "--config.batch_size or --config.seq_len.")
    shards = []
    for k in range(num_shards):
      shard = {"file": names[k], "num_examples": int(counts[k]), "num_tokens": int(tokens[k])}
      if k in todo:
        final_path = os.path.join(output_dir, names[k])
        os.replace(tmp_paths[k], final_path)
        # The sidecar is written after the shard, so it exists only for a complete shard.
        _write_json_atomically(final_path + ".json",
                               {**shard, "recipe": recipe, "corpus": stats.summary()})
      shards.append(shard)
    return shards
  finally:
    if pool is not None:
      pool.terminate()  # after an error too: no orphaned workers
    for k, path in tmp_paths.items():
      if os.path.exists(path):  # not renamed: this preparation failed
        writers[k].close()
        os.remove(path)


def default_num_workers(source: str) -> int:
  """Tokenizer processes for a source: one per core, except for small sources.

  Small sources are tokenized in this process (the tokenizer libraries use the cores by
  themselves): spawning workers costs seconds, more than a few MB of text take.
  """
  if not source:
    return 1
  if not source.startswith("tfds:"):
    total_bytes = sum(os.path.getsize(f) for f in corpus.list_text_files(source))
    if total_bytes < _SMALL_SOURCE_BYTES:
      return 1
  return os.cpu_count() or 1


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
  if num_workers is None:
    num_workers = default_num_workers(source)
  source_description = corpus.describe_source(source)
  os.makedirs(output_dir, exist_ok=True)
  metadata_path = os.path.join(output_dir, METADATA_FILE)
  existing = load_metadata(output_dir)
  if existing is not None:
    check_metadata_matches(config, existing, source_description, data_dir=output_dir)

  def read(stats=None):
    return corpus.read_documents(source, config.data.invalid_utf8, stats,
                                 tfds_data_dir=tfds_data_dir, tfds_manual_dir=tfds_manual_dir)

  tokenizer = _make_tokenizer(config, output_dir, source_description,
                              lambda: (line for document in read() for line in document))
  recipe = {"format_version": FORMAT_VERSION, "source": source_description,
            "tokenizer_sha256": tokenizer.info["sha256"], "seq_len": config.seq_len,
            "num_shards": config.data.num_shards, "short_seq_prob": config.data.short_seq_prob,
            "single_segment_prob": SINGLE_SEGMENT_PROB, "packing_seed": PACKING_SEED,
            "invalid_utf8": config.data.invalid_utf8}
  fingerprint = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
  num_shards = config.data.num_shards
  names = [shard_filename(k, num_shards) for k in range(num_shards)]
  if (existing is not None and existing.get("fingerprint") == fingerprint and
      all(os.path.exists(os.path.join(output_dir, n)) for n in names)):
    logging.info("%s is up to date (%d sequences); nothing to do.", output_dir,
                 existing["num_examples"])
    return existing

  if existing is not None:
    # Readers wait for a matching metadata.json: take the stale one away before changing shards.
    os.remove(metadata_path)
  # Temporary files of an interrupted run (one preparation per folder at a time).
  for path in glob.glob(os.path.join(output_dir, "*.tmp-*")):
    os.remove(path)
  sidecars = [_read_json(os.path.join(output_dir, n + ".json")) for n in names]
  todo = [k for k, s in enumerate(sidecars) if not (
      s and s.get("recipe") == recipe and os.path.exists(os.path.join(output_dir, names[k])))]
  if todo:
    logging.info("Preparing %d of %d shards in %s from %s with %d worker process(es).",
                 len(todo), num_shards, output_dir, source_description, max(num_workers, 1))
    stats = corpus.ReadStats()
    shards = _write_shards(config, output_dir, todo, read(stats), stats, tokenizer, num_workers,
                           recipe)
    corpus_summary = stats.summary()
  else:
    logging.info("All %d shards in %s are finished; writing %s.", num_shards, output_dir,
                 METADATA_FILE)
    shards = [{k: s[k] for k in ("file", "num_examples", "num_tokens")} for s in sidecars]
    corpus_summary = sidecars[0]["corpus"]

  # Shards of an earlier preparation with another number of shards.
  for path in glob.glob(os.path.join(output_dir, "train-*-of-*.tfrecord*")):
    if os.path.basename(path).split(".tfrecord")[0] + ".tfrecord" not in names:
      os.remove(path)
  output_bytes = sum(os.path.getsize(os.path.join(output_dir, n)) for n in os.listdir(output_dir))
  num_examples = sum(s["num_examples"] for s in shards)
  num_tokens = sum(s["num_tokens"] for s in shards)
  metadata = {
      "format_version": FORMAT_VERSION,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "source": source_description,
      "seq_len": config.seq_len,
      "vocab_size": tokenizer.vocab_size,
      "tokenizer": tokenizer.info,
      "special_ids": tokenizer.special_ids,
      "num_examples": num_examples,
      "num_tokens": num_tokens,
      "padding_fraction": 1.0 - (num_tokens + num_examples * 2) / (num_examples * config.seq_len),
      "shards": shards,
      "skipped_lines": corpus_summary["skipped_lines"],
      "corpus": corpus_summary,
      "recipe": recipe,
      "fingerprint": fingerprint,
      "wall_time_s": round(time.time() - start, 1),
      "output_bytes": output_bytes,
  }
  _write_json_atomically(metadata_path, metadata)  # last: its presence means "complete"
  logging.info("Wrote %s", metadata_path)
  return metadata


def summary(metadata: dict) -> str:
  """A short human-readable account of a preparation."""
  c = metadata["corpus"]
  lines = [
      f"source            {metadata['source']}",
      f"tokenizer         {metadata['tokenizer']['type']} {metadata['tokenizer']['path']} "
      f"(vocab {metadata['vocab_size']})",
      f"documents, lines  {c['documents']:,} documents, {c['lines']:,} lines, "
      f"{c['skipped_lines']:,} lines skipped (not UTF-8)"
      + (f", e.g. {', '.join(c['first_skipped'])}" if c["first_skipped"] else ""),
      f"sequences         {metadata['num_examples']:,} of {metadata['seq_len']} tokens in "
      f"{len(metadata['shards'])} shards ({min(s['num_examples'] for s in metadata['shards']):,}"
      f"-{max(s['num_examples'] for s in metadata['shards']):,} per shard)",
      f"tokens            {metadata['num_tokens']:,} ({metadata['padding_fraction']:.1%} padding)",
      f"output            {metadata['output_bytes'] / 2**20:.1f} MiB",
      f"wall time         {metadata['wall_time_s']:.1f} s",
  ]
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# For the trainer.


def _jax_processes() -> tuple[int, int]:
  try:
    import jax  # pylint: disable=g-import-not-at-top
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
  be on a filesystem they share. Returns the metadata (see `prepare`).

  Args:
    config: the training config.
    workdir: the training run's folder.
    process_index, process_count: default to jax.process_index() and jax.process_count().
    poll_s, timeout_s: how often, and how long, processes other than 0 look for metadata.json.
  """
  data_dir = config.data.prepared_dir or os.path.join(workdir, "data")
  if process_index is None or process_count is None:
    process_index, process_count = _jax_processes()
  metadata = _reusable_metadata(config, data_dir)
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
                                process_index, os.path.join(data_dir, METADATA_FILE))
    time.sleep(poll_s)
    metadata = _reusable_metadata(config, data_dir)
  return metadata


def _reusable_metadata(config: ml_collections.ConfigDict, data_dir: str) -> Optional[dict]:
  """The folder's metadata if the trainer can use it as it is, else None.

  An explicit config.data.prepared_dir is used whatever it was prepared from, as long as the
  model fits it (seq_len, vocab, tokenizer); WORKDIR/data must also come from config.data.source.
  """
  metadata = load_metadata(data_dir)
  if metadata is None:
    return None
  source_description = corpus.describe_source(config.data.source)
  try:
    check_metadata_matches(config, metadata, data_dir=data_dir)
  except DataError:
    return None  # prepare() says what is wrong (or process 0 is about to replace it)
  if not config.data.prepared_dir and metadata.get("source") != source_description:
    return None
  return metadata


def main(argv):
  del argv
  metadata = prepare(FLAGS.config, FLAGS.output_dir, FLAGS.source,
                     num_workers=FLAGS.num_workers, tfds_data_dir=FLAGS.tfds_data_dir,
                     tfds_manual_dir=FLAGS.tfds_manual_dir)
  print(summary(metadata))


if __name__ == "__main__":
  # Flags are defined only when run as a program, so the trainer can import this module
  # next to its own --config flag.
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  FLAGS = flags.FLAGS
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/tiny.py.",
                                  lock_config=True)
  flags.DEFINE_string("output_dir", None, "Folder for the shards and metadata.json.")
  flags.DEFINE_string("source", None, "Overrides config.data.source: text files or folders "
                      "(comma-separated), tfds:NAME[:SPLIT], or '' for the embedded default.")
  flags.DEFINE_integer("num_workers", None, "Tokenizer processes (0/1: in-process; default: "
                       "one per core, in-process for small sources).")
  flags.DEFINE_string("tfds_data_dir", None, "TFDS data_dir for tfds: sources.")
  flags.DEFINE_string("tfds_manual_dir", None, "Folder of manual downloads (openwebtext.tar.xz).")
  flags.mark_flags_as_required(["config", "output_dir"])
  app.run(main)
