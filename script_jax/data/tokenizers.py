"""Tokenizers: a SentencePiece model (trained on the corpus or given) or a WordPiece vocab.txt.

Every tokenizer here is one small object with the same surface:

  encode(text) -> list[int]            no [CLS]/[SEP] added; packing adds them
  encode_batch(texts) -> list[list[int]]
  decode(ids) -> str                   padding dropped, [CLS]/[SEP]/[MASK] shown as such
  vocab_size, special_ids              special_ids = {"pad", "unk", "cls", "sep", "mask"} -> id
  info                                 {"type", "path", ...}: what `load_tokenizer` needs

The ids of the special tokens are fixed per kind:
  sentencepiece (trained here): [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4 (BOS/EOS off);
  wordpiece (BERT uncased vocab.txt): [PAD]=0 [UNK]=100 [CLS]=101 [SEP]=102 [MASK]=103.
Special tokens are control symbols: text that spells "[MASK]" is encoded as ordinary pieces, so
raw text can never produce a special id.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import re
from typing import Iterable, Optional, Union

import sentencepiece as spm
import tokenizers as hf_tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

from script_jax import fs
from script_jax.data.corpus import DataError

SPECIAL_NAMES = ("pad", "unk", "cls", "sep", "mask")
BERT_SPECIAL_PIECES = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]",
                       "mask": "[MASK]"}
# Pieces accepted for each special token in a given SentencePiece model (ALBERT's .model uses
# <pad> and <unk>, XLNet's <cls>/<sep>/<mask>).
_SPM_SPECIAL_PIECES = {"pad": ("[PAD]", "<pad>"), "unk": ("[UNK]", "<unk>"),
                       "cls": ("[CLS]", "<cls>"), "sep": ("[SEP]", "<sep>"),
                       "mask": ("[MASK]", "<mask>")}
SENTENCEPIECE_MODEL_TYPES = ("unigram", "bpe")
# SentencePiece trains on at most the first this many lines: 1M Wikipedia paragraphs are ~330 MB
# of text (3x the 16 M-word sample, which needs 2 GB to train on), plenty for a 30k vocab; it
# bounds the trainer's memory and time on corpora of many GB such as OpenWebText.
SPM_MAX_TRAINING_LINES = 1_000_000
_SPM_MAX_LINE_BYTES = 16384  # its default (4192) silently drops long Wikipedia paragraphs


def file_sha256(path: str) -> str:
  """Hex SHA-256 of a file: a tokenizer's identity in metadata.json."""
  return hashlib.sha256(_read_bytes(path)).hexdigest()


def _read_bytes(path: str) -> bytes:
  if not fs.isfile(path):
    raise DataError(f"Tokenizer file {path} does not exist. Give an existing vocab.txt "
                    "(wordpiece) or .model (sentencepiece) with --config.data.vocab_file.")
  return fs.read_bytes(path)


def _missing_specials_error(path: str, missing: list[str], found: str) -> DataError:
  return DataError(f"Vocab {path} lacks the special tokens {missing} ({found}). Pretraining needs "
                   "[PAD], [UNK], [CLS], [SEP] and [MASK]: use a BERT-style vocab that has them, "
                   "or train a SentencePiece model here (--config.data.vocab_file='').")


class SentencePieceTokenizer:
  """A SentencePiece model; see the module docstring for the interface."""

  kind = "sentencepiece"

  def __init__(self, model_path: str, num_threads: int = -1):
    """Loads `model_path`; `num_threads` is used by encode_batch (-1: all cores)."""
    self.path = model_path
    model_proto = _read_bytes(model_path)
    try:
      self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    except RuntimeError as e:
      raise DataError(f"{model_path} is not a SentencePiece model ({e}). Give a .model file "
                      "with --config.data.vocab_file, or a vocab.txt with "
                      "--config.data.tokenizer=wordpiece.") from e
    self._num_threads = num_threads
    self.vocab_size = self._sp.get_piece_size()
    self.special_ids = self._find_special_ids()
    self._shown_ids = {self.special_ids[n]: f"[{n.upper()}]" for n in ("cls", "sep", "mask")}
    self.info = {"type": self.kind, "path": fs.abspath(model_path),
                 "sha256": hashlib.sha256(model_proto).hexdigest()}

  def _find_special_ids(self) -> dict[str, int]:
    special_ids, missing = {}, []
    for name in SPECIAL_NAMES:
      for piece in _SPM_SPECIAL_PIECES[name]:
        i = self._sp.piece_to_id(piece)
        # piece_to_id answers unk_id for pieces it does not know.
        if self._sp.id_to_piece(i) == piece:
          special_ids[name] = i
          break
      else:
        missing.append(_SPM_SPECIAL_PIECES[name][0])
    if missing:
      raise _missing_specials_error(self.path, missing, f"{self.vocab_size} pieces")
    return special_ids

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text, out_type=int)

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return self._sp.encode(list(texts), out_type=int, num_threads=self._num_threads)

  def decode(self, ids: Iterable[int]) -> str:
    # SentencePiece decodes control symbols to nothing; show [CLS]/[SEP]/[MASK] instead.
    parts, run = [], []
    for i in ids:
      i = int(i)
      if i == self.special_ids["pad"]:
        continue
      if i in self._shown_ids:
        parts += [self._sp.decode(run), self._shown_ids[i]]
        run = []
      else:
        run.append(i)
    parts.append(self._sp.decode(run))
    return " ".join(p for p in parts if p)


class WordPieceTokenizer:
  """A BERT WordPiece vocab.txt through Hugging Face `tokenizers` (BERT's normaliser and
  pre-tokeniser, greedy longest-match-first WordPiece); see the module docstring."""

  kind = "wordpiece"

  def __init__(self, vocab_path: str, lowercase: Optional[bool] = None):
    """Loads `vocab_path`, one token per line. `lowercase=None` infers it from the vocab:
    a vocab without upper-case tokens is uncased (BERT uncased also strips accents)."""
    self.path = vocab_path
    data = _read_bytes(vocab_path)
    try:
      tokens = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
      raise DataError(f"{vocab_path} is not a UTF-8 vocab.txt ({e.reason}); a SentencePiece "
                      ".model needs --config.data.tokenizer=sentencepiece.") from None
    vocab = {}
    for i, token in enumerate(tokens):
      vocab.setdefault(token.strip(), i)  # a duplicate keeps its first id, as in BERT
    missing = [p for p in BERT_SPECIAL_PIECES.values() if p not in vocab]
    if missing:
      raise _missing_specials_error(vocab_path, missing, f"{len(tokens)} lines")
    if lowercase is None:
      lowercase = not any(t != t.lower() for t in vocab if not t.startswith("["))
    self.lowercase = bool(lowercase)
    self.vocab_size = len(tokens)
    self.special_ids = {n: vocab[p] for n, p in BERT_SPECIAL_PIECES.items()}
    self._tok = hf_tokenizers.Tokenizer(models.WordPiece(
        vocab, unk_token="[UNK]", max_input_chars_per_word=200))  # BERT's limit
    self._tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, lowercase=self.lowercase)
    self._tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    self._tok.decoder = decoders.WordPiece(prefix="##")
    self.info = {"type": self.kind, "path": fs.abspath(vocab_path),
                 "sha256": hashlib.sha256(data).hexdigest(), "lowercase": self.lowercase}

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    # The special tokens are plain vocab entries, not "added tokens", so none is ever matched
    # in the text; encode_batch_fast skips the character offsets we do not need.
    return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

  def decode(self, ids: Iterable[int]) -> str:
    pad_id = self.special_ids["pad"]
    return self._tok.decode([int(i) for i in ids if int(i) != pad_id], skip_special_tokens=False)


Tokenizer = Union[SentencePieceTokenizer, WordPieceTokenizer]


def load_tokenizer(tokenizer_info: dict, num_threads: int = -1) -> Tokenizer:
  """Rebuilds a tokenizer from metadata (`metadata["tokenizer"]`: type, path, ...).

  Raises DataError when the file changed since the data was prepared (its SHA-256 differs).
  """
  kind, path = tokenizer_info.get("type"), tokenizer_info.get("path")
  if kind == SentencePieceTokenizer.kind:
    tokenizer = SentencePieceTokenizer(path, num_threads=num_threads)
  elif kind == WordPieceTokenizer.kind:
    tokenizer = WordPieceTokenizer(path, lowercase=tokenizer_info.get("lowercase"))
  else:
    raise DataError(f"Unknown tokenizer type {kind!r} in {tokenizer_info}; expected "
                    "'sentencepiece' or 'wordpiece'.")
  expected = tokenizer_info.get("sha256")
  if expected and expected != tokenizer.info["sha256"]:
    raise DataError(f"Tokenizer file {path} changed since the data was prepared (SHA-256 "
                    f"{tokenizer.info['sha256'][:12]}..., expected {expected[:12]}...). "
                    "Prepare the data again.")
  return tokenizer


def train_sentencepiece(lines: Iterable[str], vocab_size: int, model_path: str, *,
                        model_type: str = "unigram", seed: int = 0,
                        max_training_lines: int = SPM_MAX_TRAINING_LINES,
                        num_threads: Optional[int] = None) -> SentencePieceTokenizer:
  """Trains a SentencePiece model on `lines` and writes it to `model_path` (atomically).

  Fixed ids: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4, no BOS/EOS. Text is NFKC-normalised and
  case-folded (nmt_nfkc_cf), i.e. an uncased model like BERT uncased. The vocab has exactly
  `vocab_size` pieces, or DataError says how many the corpus supports. Only the first
  `max_training_lines` lines are read.
  """
  if model_type not in SENTENCEPIECE_MODEL_TYPES:
    raise DataError(f"SentencePiece model type {model_type!r}; use one of "
                    f"{SENTENCEPIECE_MODEL_TYPES}.")
  num_lines = 0

  def counted(it):
    nonlocal num_lines
    for line in it:
      num_lines += 1
      yield line

  spm.set_random_generator_seed(seed)  # for whatever the trainer draws at random
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=counted(itertools.islice(lines, max_training_lines)),
        model_writer=model,
        vocab_size=vocab_size, model_type=model_type,
        pad_id=0, pad_piece="[PAD]", unk_id=1, unk_piece="[UNK]", bos_id=-1, eos_id=-1,
        control_symbols="[CLS],[SEP],[MASK]",
        normalization_rule_name="nmt_nfkc_cf",
        character_coverage=0.9999,
        hard_vocab_limit=True,
        max_sentence_length=_SPM_MAX_LINE_BYTES,
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=1)
  except RuntimeError as e:
    message = str(e)
    if num_lines == 0:
      raise DataError("No text to train the SentencePiece model on; the source is empty.") from e
    limit = re.search(r"value <= (\d+)", message)
    if limit:
      raise DataError(
          f"The corpus is too small for a SentencePiece vocab of {vocab_size}: it supports at "
          f"most {limit.group(1)} pieces. Set --config.model.vocab_size={limit.group(1)} or less, "
          "or add text.") from e
    raise DataError(f"SentencePiece training failed ({message.strip()}); vocab_size="
                    f"{vocab_size}, {num_lines} lines of text.") from e
  fs.write_atomically(model_path, model.getvalue())
  return SentencePieceTokenizer(model_path)
