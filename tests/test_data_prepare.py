"""Tests of script_jax/data/preparation.py: packing, shards, metadata, reruns and errors."""

import collections
import json
import os
import random

import numpy as np
import pytest
import tensorflow as tf

from script_jax import config_lib
from script_jax.data import corpus
from script_jax.data import preparation, prepared_folder, packing
from script_jax.data import tokenizers
from script_jax.data.corpus import DataError

SPECIAL = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}


def small_config(**data):
  c = config_lib.base_config()
  c.model.vocab_size = 512
  c.seq_len = 64
  c.batch_size = 16
  c.mask.max_predictions_per_seq = config_lib.max_predictions_for(c.seq_len)
  c.data.tokenizer = "sentencepiece"
  c.data.num_shards = 4
  c.data.eval_fraction = 0.05  # 4 of the default corpus's 79 documents
  for k, v in data.items():
    c.data[k] = v
  return c


def read_shard(path, seq_len):
  """A shard's (input_ids, segment_ids) as int arrays [n, seq_len]."""
  features = {"input_ids": tf.io.FixedLenFeature([seq_len], tf.int64),
              "segment_ids": tf.io.FixedLenFeature([seq_len], tf.int64)}
  rows = [tf.io.parse_single_example(r, features) for r in tf.data.TFRecordDataset(path)]
  return (np.array([r["input_ids"].numpy() for r in rows]),
          np.array([r["segment_ids"].numpy() for r in rows]))


def read_all_in_order(data_dir, metadata):
  """Every sequence, in the order packing made them (example j is in shard j % num_shards)."""
  shards = [read_shard(os.path.join(data_dir, s["file"]), metadata["seq_len"])
            for s in metadata["shards"]]
  n = len(shards)
  ids = [shards[j % n][0][j // n] for j in range(metadata["num_examples"])]
  segments = [shards[j % n][1][j // n] for j in range(metadata["num_examples"])]
  return np.array(ids), np.array(segments)


@pytest.fixture(scope="module")
def default_data(tmp_path_factory):
  """The embedded default corpus, prepared once for these tests (in-process: fast)."""
  out = str(tmp_path_factory.mktemp("default"))
  metadata = preparation.prepare(small_config(), out, num_workers=1)
  return out, metadata


# ---------------------------------------------------------------------------------------------
# Packing.


def check_layout(ids_T, segments_T, seq_len):
  """[CLS] A [SEP] (B [SEP]) [PAD]...; returns the number of segments."""
  n = int(np.sum(ids_T != SPECIAL["pad"]))
  assert ids_T[0] == SPECIAL["cls"] and ids_T[n - 1] == SPECIAL["sep"]
  assert np.all(ids_T[n:] == SPECIAL["pad"]) and np.all(segments_T[n:] == 0)
  seps = np.flatnonzero(ids_T == SPECIAL["sep"])
  assert len(seps) in (1, 2) and seps[-1] == n - 1
  first_sep = seps[0]
  assert np.all(segments_T[:first_sep + 1] == 0)
  assert np.all(segments_T[first_sep + 1:n] == 1)
  if len(seps) == 2:
    assert seps[1] > first_sep + 1  # B is not empty
  return len(seps)


def test_pack_document_lossless_and_within_length():
  rng = random.Random(0)
  for trial in range(200):
    seq_len = rng.choice([8, 16, 64, 128])
    lines = [[rng.randrange(5, 100) for _ in range(rng.randrange(1, 3 * seq_len))]
             for _ in range(rng.randrange(1, 12))]
    pairs = packing.pack_document(lines, seq_len, random.Random(trial), 0.1)
    assert [t for a, b in pairs for t in a + b] == [t for line in lines for t in line]
    ids, segments = packing.pairs_to_arrays(pairs, seq_len, SPECIAL)
    for ids_T, segments_T in zip(ids, segments):
      check_layout(ids_T, segments_T, seq_len)


def test_pack_document_fills_sequences_and_mostly_two_segments():
  rng = random.Random(1)
  lines = [[rng.randrange(5, 100) for _ in range(rng.randrange(5, 40))] for _ in range(5000)]
  pairs = packing.pack_document(lines, 128, random.Random(0), short_seq_prob=0.1)
  lengths = np.array([len(a) + len(b) + (3 if b else 2) for a, b in pairs])
  two_segments = np.mean([bool(b) for a, b in pairs])
  assert 0.85 < two_segments < 0.95  # ELECTRA: 10% have one segment
  assert np.mean(lengths >= 126) > 0.85  # most reach their full length
  assert 0.05 < np.mean(lengths < 120) < 0.15  # short_seq_prob of shorter targets
  assert lengths.max() == 128 and lengths.min() >= 5


def test_pack_document_short_seq_prob_zero():
  lines = [[7] * 30] * 100
  pairs = packing.pack_document(lines, 64, random.Random(0), short_seq_prob=0.0)
  lengths = [len(a) + len(b) + (3 if b else 2) for a, b in pairs]
  assert all(n >= 63 for n in lengths[:-1])  # all but the document's last are full


# ---------------------------------------------------------------------------------------------
# prepare() on the embedded default corpus.


def test_default_corpus_end_to_end(default_data):
  out, metadata = default_data
  config = small_config()
  assert metadata["seq_len"] == 64 and metadata["vocab_size"] == 512
  assert metadata["special_ids"] == SPECIAL
  assert metadata["tokenizer"]["type"] == "sentencepiece"
  assert metadata["tokenizer"]["path"] == os.path.join(out, "spm.model")
  assert metadata["source"] == corpus.DEFAULT_SOURCE_DESCRIPTION
  assert metadata["skipped_lines"] == 0 and metadata["corpus"]["documents"] == 79
  assert len(metadata["shards"]) == 4
  counts = [s["num_examples"] for s in metadata["shards"]]
  assert sum(counts) == metadata["num_examples"] > 1000 and max(counts) - min(counts) <= 1
  with open(os.path.join(out, "metadata.json")) as f:
    assert json.load(f)["num_examples"] == metadata["num_examples"]
  assert prepared_folder.load_metadata(out)["fingerprint"] == metadata["fingerprint"]
  # The trainer and the scorer rebuild the tokenizer from the metadata alone.
  tokenizer = tokenizers.load_tokenizer(metadata["tokenizer"])
  assert tokenizer.special_ids == SPECIAL and tokenizer.vocab_size == config.model.vocab_size
  summary = prepared_folder.summary(metadata)
  assert f"{metadata['num_examples']:,} of 64 tokens in 4 shards" in summary
  split = prepared_folder.eval_split(metadata)
  assert split["fraction"] == 0.05 and split["num_documents"] == 4
  assert split["shards"][0]["file"] == prepared_folder.EVAL_SHARD_FILENAME
  assert split["num_examples"] == split["shards"][0]["num_examples"] > 0
  assert "4 held-out documents" in prepared_folder.summary(metadata)


def test_held_out_documents_are_every_nth_and_at_least_one():
  chosen = lambda n, f: [i for i in range(n) if prepared_folder.is_held_out(i, f)]
  assert chosen(79, 0.05) == [0, 20, 40, 60]
  assert chosen(79, 0.01) == [0]  # at least one document
  assert chosen(1000, 0.01) == list(range(0, 1000, 100))
  assert chosen(10, 0.0) == []
  for n, f in [(79, 0.05), (1234, 0.013), (5, 0.5), (7, 0.3)]:
    assert len(chosen(n, f)) == int(np.ceil(n * f))


def test_every_token_accounted_for(default_data):
  """The training shards hold the tokens of the documents not held out, the evaluation shard
  those of the held-out documents: each in the corpus's order, none lost, none in both."""
  out, metadata = default_data
  ids, segments = read_all_in_order(out, metadata)
  eval_ids, eval_segments = read_shard(os.path.join(out, prepared_folder.EVAL_SHARD_FILENAME), 64)
  two = [check_layout(i, s, 64) for i, s in zip([*ids, *eval_ids], [*segments, *eval_segments])]
  assert np.mean(np.array(two) == 2) > 0.75  # most sequences have two segments
  tokenizer = tokenizers.load_tokenizer(metadata["tokenizer"])
  train_corpus_ids, eval_corpus_ids = [], []
  for index, doc in enumerate(corpus.read_documents("")):
    held_out = prepared_folder.is_held_out(index, 0.05)
    (eval_corpus_ids if held_out else train_corpus_ids).extend(
        t for line in tokenizer.encode_batch(doc) for t in line)
  structural = [SPECIAL["cls"], SPECIAL["sep"], SPECIAL["pad"]]
  packed_ids = ids[~np.isin(ids, structural)]
  packed_eval_ids = eval_ids[~np.isin(eval_ids, structural)]
  # None lost, none invented, and in the corpus's order.
  assert collections.Counter(packed_ids.tolist()) == collections.Counter(train_corpus_ids)
  assert packed_ids.tolist() == train_corpus_ids
  assert packed_eval_ids.tolist() == eval_corpus_ids
  assert metadata["num_tokens"] == len(train_corpus_ids)
  assert sum(s["num_tokens"] for s in metadata["shards"]) == len(train_corpus_ids)
  assert metadata["eval"]["num_tokens"] == len(eval_corpus_ids)
  # No sequence of a held-out document is in a training shard.
  train_rows = {tuple(row) for row in ids}
  assert not any(tuple(row) in train_rows for row in eval_ids)


def test_worker_processes_give_the_same_shards(default_data, tmp_path):
  out, metadata = default_data
  again = preparation.prepare(small_config(), str(tmp_path), num_workers=2)
  assert again["fingerprint"] == metadata["fingerprint"]
  for s in metadata["shards"] + metadata["eval"]["shards"]:
    with open(os.path.join(out, s["file"]), "rb") as a, \
         open(os.path.join(tmp_path, s["file"]), "rb") as b:
      assert a.read() == b.read()


def _mtimes(path):
  return {n: os.stat(os.path.join(path, n)).st_mtime_ns for n in os.listdir(path)}


def test_rerun_skips_finished_work(default_data):
  out, metadata = default_data
  before = _mtimes(out)
  again = preparation.prepare(small_config(), out, num_workers=1)
  assert again == prepared_folder.load_metadata(out)
  assert _mtimes(out) == before  # nothing rewritten, not even metadata.json


def test_rerun_completes_an_interrupted_preparation(tmp_path):
  out = str(tmp_path)
  config = small_config()
  metadata = preparation.prepare(config, out, num_workers=1)
  shard = metadata["shards"][2]["file"]
  with open(os.path.join(out, shard), "rb") as f:
    shard_bytes = f.read()
  # As if killed while writing shard 2: no metadata.json, no sidecar, a half temp file.
  os.remove(os.path.join(out, "metadata.json"))
  os.remove(os.path.join(out, shard + ".json"))
  os.remove(os.path.join(out, shard))
  with open(os.path.join(out, shard + ".tmp-99999"), "wb") as f:
    f.write(b"garbage")
  before = _mtimes(out)
  again = preparation.prepare(config, out, num_workers=1)
  after = _mtimes(out)
  for s in metadata["shards"]:
    if s["file"] != shard:
      assert after[s["file"]] == before[s["file"]]  # finished shards untouched
  with open(os.path.join(out, shard), "rb") as f:
    assert f.read() == shard_bytes  # the redone shard is the same
  assert not os.path.exists(os.path.join(out, shard + ".tmp-99999"))
  assert again["shards"] == metadata["shards"]
  assert again["corpus"] == metadata["corpus"]

  # Finished shards without metadata.json (killed just before it): only metadata is written.
  os.remove(os.path.join(out, "metadata.json"))
  before = _mtimes(out)
  assert preparation.prepare(config, out, num_workers=1)["shards"] == metadata["shards"]
  assert {k: v for k, v in _mtimes(out).items() if k != "metadata.json"} == before


def test_changing_num_shards_rewrites_the_shards(tmp_path):
  out = str(tmp_path)
  preparation.prepare(small_config(), out, num_workers=1)
  metadata = preparation.prepare(small_config(num_shards=2), out, num_workers=1)
  assert [s["file"] for s in metadata["shards"]] == [
      "train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord"]
  assert not [n for n in os.listdir(out) if "-of-00004" in n]  # the old ones are gone


@pytest.mark.parametrize("change, message", [
    (lambda c: setattr(c, "seq_len", 32), "seq_len 64, not config.seq_len=32"),
    (lambda c: setattr(c.model, "vocab_size", 600), "vocab_size 512, not config.model.vocab_size"),
    (lambda c: setattr(c.data, "tokenizer", "wordpiece"), "tokenizer 'sentencepiece', not"),
])
def test_prepared_with_another_config_is_a_clear_error(default_data, change, message):
  out, _ = default_data
  config = small_config()
  change(config)
  with pytest.raises(DataError, match=f"{out} was prepared with .*{message}.*delete this one"):
    preparation.prepare(config, out)


def test_prepared_from_another_source_is_a_clear_error(default_data, tmp_path):
  out, _ = default_data
  (tmp_path / "a.txt").write_text("some text\n")
  with pytest.raises(DataError, match="was prepared with source 'embedded default"):
    preparation.prepare(small_config(), out, source=str(tmp_path / "a.txt"))


def test_text_files_with_a_wordpiece_vocab(tmp_path):
  words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "."]
  (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
  text = "".join(f"The cat sat on the mat {i}.\nThe mat sat.\n\n" for i in range(40))
  (tmp_path / "corpus.txt").write_bytes(text.encode() + b"bad \xff line\nthe cat.\n")
  config = small_config(tokenizer="wordpiece", vocab_file=str(tmp_path / "vocab.txt"),
                        num_shards=2)
  config.model.vocab_size = len(words)
  config.seq_len = 16
  config.batch_size = 8
  out = str(tmp_path / "out")
  metadata = preparation.prepare(config, out, source=str(tmp_path / "corpus.txt"),
                                 num_workers=1)
  assert metadata["tokenizer"]["type"] == "wordpiece"
  assert metadata["tokenizer"]["path"] == os.path.join(out, "vocab.txt")  # a copy
  assert metadata["special_ids"] == SPECIAL
  assert metadata["skipped_lines"] == 1 and metadata["corpus"]["documents"] == 41
  ids, _ = read_all_in_order(out, metadata)
  eval_ids, _ = read_shard(os.path.join(out, prepared_folder.EVAL_SHARD_FILENAME), 16)
  assert metadata["eval"]["num_documents"] == 3  # documents 0, 20 and 40 of 41
  assert np.sum(ids == 1) + np.sum(eval_ids == 1) == 40  # the digits are [UNK]
  config.data.invalid_utf8 = "error"
  with pytest.raises(DataError, match="corpus.txt:121: not valid UTF-8"):
    preparation.prepare(config, str(tmp_path / "out3"), source=str(tmp_path / "corpus.txt"))


def test_wordpiece_without_vocab_file(tmp_path):
  config = small_config(tokenizer="wordpiece")
  with pytest.raises(DataError, match="needs a vocab: pass --config.data.vocab_file"):
    preparation.prepare(config, str(tmp_path))


def test_vocab_size_must_match_the_tokenizer(tmp_path):
  (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\n")
  config = small_config(tokenizer="wordpiece", vocab_file=str(tmp_path / "vocab.txt"))
  with pytest.raises(DataError, match="has 6 entries but config.model.vocab_size=512"):
    preparation.prepare(config, str(tmp_path / "out"))


def test_too_little_data_for_one_batch(tmp_path):
  (tmp_path / "small.txt").write_text("Only a few words here.\n\nAnd a second document.\n")
  (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nonly\na\nfew\n")
  config = small_config(num_shards=2, tokenizer="wordpiece",
                        vocab_file=str(tmp_path / "vocab.txt"))
  config.batch_size = 64
  config.model.vocab_size = 8
  out = str(tmp_path / "out")
  with pytest.raises(DataError, match=r"Only 1 training sequences.*1 sequences held out\), "
                                      r"fewer than one global batch of config.batch_size=64"):
    preparation.prepare(config, out, source=str(tmp_path / "small.txt"), num_workers=1)
  assert not [n for n in os.listdir(out) if n.endswith(".tfrecord") or "tmp" in n]
  assert prepared_folder.load_metadata(out) is None
  # One document (no blank lines): it is the evaluation split, and the error says so.
  (tmp_path / "one.txt").write_text("Only a few words here.\nAnd a few more.\n" * 50)
  config.batch_size = 2
  with pytest.raises(DataError, match=r"All 1 document\(s\) of the source went to the "
                                      r"evaluation split.*blank lines.*eval_fraction=0"):
    preparation.prepare(config, str(tmp_path / "out1"), source=str(tmp_path / "one.txt"),
                        num_workers=1)
  config.data.eval_fraction = 0.0
  metadata = preparation.prepare(config, str(tmp_path / "out0"), source=str(tmp_path / "one.txt"),
                                 num_workers=1)
  assert metadata["num_examples"] > 2 and prepared_folder.eval_split(metadata) is None


def test_missing_source_file(tmp_path):
  with pytest.raises(DataError, match="does not exist"):
    preparation.prepare(small_config(), str(tmp_path / "out"), source=str(tmp_path / "x.txt"))


def test_prepare_pretraining_data_for_the_trainer(default_data, tmp_path):
  out, metadata = default_data
  config = small_config()
  # A workdir without data: process 0 prepares WORKDIR/data from the embedded default...
  workdir = str(tmp_path / "run")
  first = preparation.prepare_pretraining_data(config, workdir, process_index=0,
                                               process_count=1)
  assert first["fingerprint"] == metadata["fingerprint"]
  assert os.path.exists(os.path.join(workdir, "data", "metadata.json"))
  # ... and the next call (or another process) reuses it.
  before = _mtimes(os.path.join(workdir, "data"))
  assert preparation.prepare_pretraining_data(config, workdir, process_index=1,
                                              process_count=2) == first
  assert _mtimes(os.path.join(workdir, "data")) == before
  # An explicit prepared_dir is used as it is.
  config.data.prepared_dir = out
  assert preparation.prepare_pretraining_data(config, "/nonexistent", process_index=0,
                                              process_count=1)["num_examples"] == \
      metadata["num_examples"]


def test_other_processes_wait_for_process_0(tmp_path):
  with pytest.raises(DataError, match="Process 1 waited"):
    preparation.prepare_pretraining_data(small_config(), str(tmp_path), process_index=1,
                                         process_count=2, poll_s=0.01, timeout_s=0.05)
