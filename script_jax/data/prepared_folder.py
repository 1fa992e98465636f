"""The prepared-data folder: its metadata.json, the checks that it fits a config, and where it is.

A prepared folder holds `train-XXXXX-of-YYYYY.tfrecord` shards (each with a `.json` sidecar written
once it is complete), the tokenizer (`spm.model` or `vocab.txt`) and `metadata.json`, written last:
its presence means "complete". The trainer, the scorer and fine-tuning read the folder through this
module; `preparation.py` writes it.
"""

from __future__ import annotations

import math
from typing import Optional

import ml_collections

from script_jax import config_lib
from script_jax import fs
from script_jax.data import tokenizers
from script_jax.data.corpus import DataError

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"


def data_dir_of(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The prepared-data folder of a run: config.data.prepared_dir, or WORKDIR/data."""
  return config.data.prepared_dir or fs.join(workdir, "data")


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
  path = fs.join(data_dir, METADATA_FILE)
  if not fs.exists(path):
    return None
  try:
    metadata = fs.read_json(path)
  except (OSError, ValueError) as e:
    raise DataError(f"{path} is unreadable ({e}); delete it and prepare the data again.") from e
  tokenizer_info = metadata.get("tokenizer", {})
  if tokenizer_info.get("filename"):
    tokenizer_info["path"] = fs.abspath(fs.join(data_dir, tokenizer_info["filename"]))
  return metadata


def check_metadata_matches(config: ml_collections.ConfigDict, metadata: dict,
                           source_description: Optional[str] = None,
                           data_dir: str = "the data folder") -> None:
  """Raises DataError when prepared data does not fit the config.

  Reading (pipeline.py) needs the same seq_len, vocab_size and tokenizer type (and the same
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
  if vocab_file and fs.isfile(vocab_file):
    prepared_sha = metadata.get("tokenizer", {}).get("sha256")
    if prepared_sha != tokenizers.file_sha256(vocab_file):
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


def shard_filename(index: int, num_shards: int) -> str:
  return f"train-{index:05d}-of-{num_shards:05d}.tfrecord"


EVAL_SHARD_FILENAME = "eval-00000-of-00001.tfrecord"


def shard_filenames(num_shards: int, eval_fraction: float) -> list[str]:
  """The files a preparation writes: the training shards, then the evaluation shard (if any)."""
  names = [shard_filename(k, num_shards) for k in range(num_shards)]
  return names + [EVAL_SHARD_FILENAME] if eval_fraction > 0 else names


def is_held_out(document_index: int, eval_fraction: float) -> bool:
  """Whether a document goes to the evaluation split: every document whose index crosses a
  multiple of 1 / eval_fraction, so ceil(N * eval_fraction) of N documents, the first always
  (at least one), spread evenly over the corpus (sources are often ordered by topic or date)."""
  return eval_fraction > 0 and (math.ceil((document_index + 1) * eval_fraction) >
                                math.ceil(document_index * eval_fraction))


def eval_split(metadata: dict) -> Optional[dict]:
  """The evaluation split of a prepared folder, None for one prepared without it."""
  return metadata.get("eval") if metadata.get("eval", {}).get("num_examples") else None


def no_eval_split_message(data_dir: str) -> str:
  return (f"{data_dir} has no evaluation split (prepared before data.eval_fraction existed, or "
          "with data.eval_fraction=0 or too little text): training goes on without held-out "
          "metrics. To get them, prepare the data again into a new folder "
          "(--config.data.prepared_dir=NEW_FOLDER, or a new --workdir); this folder is left as "
          "it is.")


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
      "evaluation        " + (
          f"{split['num_documents']:,} held-out documents ({split['fraction']:g} of them), "
          f"{split['num_examples']:,} sequences, {split['num_tokens']:,} tokens"
          if (split := eval_split(metadata)) else "none (data.eval_fraction=0, or no split)"),
      f"output            {metadata['output_bytes'] / 2**20:.1f} MiB",
      f"wall time         {metadata['wall_time_s']:.1f} s",
  ]
  return "\n".join(lines)


def load_workdir_tokenizer(workdir: str, config: ml_collections.ConfigDict):
  """(tokenizer, special_ids) a pretraining run used, from its prepared-data metadata.json.

  Scoring, fine-tuning and export tokenize with it; its size must be the model's vocabulary.
  """
  data_dir = data_dir_of(config, workdir)
  path = fs.join(data_dir, METADATA_FILE)
  metadata = load_metadata(data_dir)  # re-points a moved folder's tokenizer path
  if metadata is None:
    raise DataError(f"No tokenizer for {workdir}: {path} does not exist (the prepared-data "
                    "metadata written before pretraining).")
  if "tokenizer" not in metadata:
    raise DataError(f"{path} has no 'tokenizer' entry.")
  tokenizer = tokenizers.load_tokenizer(metadata["tokenizer"])
  special_ids = dict(metadata.get("special_ids") or tokenizer.special_ids)
  problem = config_lib.vocab_size_problem(tokenizer.vocab_size, config, tokenizer.path)
  if problem:
    raise DataError(problem)
  return tokenizer, special_ids
