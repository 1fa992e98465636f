"""The tokenizer of a HuggingFace folder: ours written so `AutoTokenizer` gives our ids, and back.

Export writes

  tokenizer.json            a `tokenizers` pipeline that reproduces our ids (checked on text
                            before anything is written); [CLS] A [SEP] / [CLS] A [SEP] B [SEP]
                            with token types 0 and 1, as our packing and GLUE featurizing
  tokenizer_config.json     tokenizer_class PreTrainedTokenizerFast: it loads tokenizer.json as
                            it is (BertTokenizer would rebuild WordPiece with a 100-character
                            word limit where ours and Google's BERT have 200)
  special_tokens_map.json
  vocab.txt or spm.model    our own tokenizer file, so the folder comes back here unchanged

WordPiece (BERT's normaliser and pre-tokeniser) is written as it is. A SentencePiece model
becomes a `tokenizers` Unigram (or BPE) model with its precompiled normalisation map and the
Metaspace pre-tokeniser, as transformers' own converter does for ALBERT or T5; models this
cannot reproduce (byte fallback, user-defined or byte pieces, non-default whitespace handling,
word or char models) are refused.

One difference is HuggingFace's design, not a conversion gap: its tokenizers match special
tokens in raw text, so text spelling "[MASK]" gives the mask id there (what fill-mask needs),
while ours encodes it as ordinary pieces.
"""

from __future__ import annotations

import json
from pydoc_data.topics import topics
from typing import Optional, Sequence

from sentencepiece import sentencepiece_model_pb2
import tokenizers
from tokenizers import AddedToken
from tokenizers import decoders
from tokenizers import models
from tokenizers import normalizers
from tokenizers import pre_tokenizers
from tokenizers import processors

from script_jax import cli_errors
from script_jax import fs
from script_jax.data import tokenizers as our_tokenizers

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
VOCAB_TXT = "vocab.txt"
SPM_MODEL = "spm.model"
# Text that exercises what tokenizers get wrong: spaces, case, width, accents, unknown
# characters, punctuation. The check also runs on lines of the embedded corpus.
_CHECK_TEXTS = (
    "  Hello   World  ", "\tTabbed\ttext\n", "ＦＵＬＬ width ＡＢＣ", "Café naïve résumé Ångström",
    "emoji 😀😀 and 中文字符 and ﬁ ligature", "x" * 150, "A.B,C;D:E (f) [g] {h} <i>", "ß Ⅻ ①",
    "multiple\n\nlines", "\u3000ideographic\u3000space", "don't won't 1,000.50 $5 #tag @user",
)

# SentencePiece piece types (sentencepiece_model.proto).
_NORMAL, _UNKNOWN, _CONTROL = 1, 2, 3
_SPM_TYPES = {1: "normal", 2: "unknown", 3: "control", 4: "user-defined", 5: "unused", 6: "byte"}


class TokenizerExportError(cli_errors.UserError):
  """The tokenizer cannot be written as (or read from) a HuggingFace tokenizer."""


def _read(path: str) -> bytes:
  return fs.read_bytes(path)


# ----------------------------------------------------------------------------- export

def _wordpiece_backend(tokenizer):
  # The same pipeline object our WordPieceTokenizer encodes with (one home for its settings).
  return tokenizers.Tokenizer.from_str(tokenizer._tok.to_str())  # pylint: disable=protected-access


def _sentencepiece_backend(tokenizer):
  """A `tokenizers` pipeline equal to the SentencePiece model, or TokenizerExportError."""
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(_read(tokenizer.path))
  trainer, norm = proto.trainer_spec, proto.normalizer_spec
  problems = []
  model_type = {1: "unigram", 2: "bpe"}.get(trainer.model_type)
  if model_type is None:
    problems.append(f"model type {trainer.model_type} (only unigram and bpe are converted)")
  if trainer.byte_fallback:
    problems.append("byte_fallback")
  odd = sorted({_SPM_TYPES.get(p.type, str(p.type)) for p in proto.pieces
                if p.type not in (_NORMAL, _UNKNOWN, _CONTROL)})
  if odd:
    problems.append(f"{', '.join(odd)} pieces")
  for flag in ("add_dummy_prefix", "remove_extra_whitespaces", "escape_whitespaces"):
    if not getattr(norm, flag):
      problems.append(f"normalizer {flag}=false")
  if problems:
    raise TokenizerExportError(
        f"The SentencePiece model {tokenizer.path} has {'; '.join(problems)}: no transformers "
        "tokenizer is known to reproduce its ids, so it is not exported. Models trained here "
        "(unigram or bpe, the defaults) are.")
  vocab = [(p.piece, p.score) for p in proto.pieces]
  unk_id = trainer.unk_id
  if model_type == "unigram":
    model = models.Unigram(vocab, unk_id=unk_id, byte_fallback=False)
  else:
    ids = {piece: i for i, (piece, _) in enumerate(vocab)}
    merges = []  # SentencePiece merges by the merged piece's rank: its position in the vocab
    for i, p in enumerate(proto.pieces):
      if p.type != _NORMAL:
        continue
      for k in range(1, len(p.piece)):
        left, right = p.piece[:k], p.piece[k:]
        if left in ids and right in ids:
          merges.append((i, ids[left], ids[right], left, right))
    merges.sort()
    model = models.BPE(ids, [(l, r) for *_, l, r in merges], unk_token=vocab[unk_id][0],
                       fuse_unk=True, byte_fallback=False)
  backend = tokenizers.Tokenizer(model)
  steps = [normalizers.Strip(left=False, right=True),
           normalizers.Replace(tokenizers.Regex(" {2,}"), "▁")]
  if norm.precompiled_charsmap:
    steps.insert(0, normalizers.Precompiled(norm.precompiled_charsmap))
  backend.normalizer = normalizers.Sequence(steps)
  backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
  backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
  return backend


def check_texts() -> list[str]:
  """The texts export checks the converted tokenizer on: tricky strings and corpus lines."""
  lines = [line.strip() for t in sorted(topics)[:40] for line in topics[t].splitlines()
           if line.strip()]
  return list(_CHECK_TEXTS) + lines[:2000]


def check_same_ids(tokenizer, backend, texts: Optional[Sequence[str]] = None) -> None:
  """Raises TokenizerExportError naming the first text on which `backend` gives other ids."""
  texts = list(check_texts() if texts is None else texts)
  ours = tokenizer.encode_batch(texts)
  theirs = [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
  for text, a, b in zip(texts, ours, theirs):
    if list(a) != list(b):
      raise TokenizerExportError(
          f"The converted tokenizer does not reproduce {tokenizer.path}: on {text[:80]!r} ours "
          f"gives {list(a)[:12]}, the HuggingFace one {list(b)[:12]}. Not exported.")


def backend_of(tokenizer):
  """A `tokenizers.Tokenizer` giving our ids (no special tokens added), checked on text."""
  if tokenizer.kind == our_tokenizers.WordPieceTokenizer.kind:
    backend = _wordpiece_backend(tokenizer)
  elif tokenizer.kind == our_tokenizers.SentencePieceTokenizer.kind:
    backend = _sentencepiece_backend(tokenizer)
  else:
    raise TokenizerExportError(f"Unknown tokenizer kind {tokenizer.kind!r}.")
  check_same_ids(tokenizer, backend)
  return backend


def special_pieces(tokenizer, special_ids: dict[str, int]) -> dict[str, str]:
  """{"pad": "[PAD]", ...}: the piece of each special id."""
  if tokenizer.kind == our_tokenizers.WordPieceTokenizer.kind:
    return dict(our_tokenizers.BERT_SPECIAL_PIECES)
  return {name: tokenizer._sp.id_to_piece(i)  # pylint: disable=protected-access
          for name, i in special_ids.items()}


def tokenizer_files(tokenizer, special_ids: dict[str, int], model_max_length: int
                    ) -> dict[str, bytes]:
  """{file name: content} of the tokenizer files of a HuggingFace folder."""
  backend = backend_of(tokenizer)
  pieces = special_pieces(tokenizer, special_ids)
  backend.add_special_tokens([AddedToken(pieces[n], special=True, normalized=False)
                              for n in our_tokenizers.SPECIAL_NAMES])
  for name in our_tokenizers.SPECIAL_NAMES:
    if backend.token_to_id(pieces[name]) != special_ids[name]:
      raise TokenizerExportError(f"The special token {pieces[name]} has id "
                                 f"{backend.token_to_id(pieces[name])} in the converted "
                                 f"tokenizer, {special_ids[name]} in ours.")
  cls, sep = pieces["cls"], pieces["sep"]
  backend.post_processor = processors.TemplateProcessing(
      single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
      special_tokens=[(cls, special_ids["cls"]), (sep, special_ids["sep"])])
  special_map = {f"{n}_token": pieces[n] for n in our_tokenizers.SPECIAL_NAMES}
  config = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      **special_map,
      "model_max_length": int(model_max_length),
      "model_input_names": ["input_ids", "token_type_ids", "attention_mask"],
      "clean_up_tokenization_spaces": False,
      "padding_side": "right",
      "truncation_side": "right",
      "script_jax_tokenizer": tokenizer.kind,
  }
  files = {TOKENIZER_JSON: backend.to_str(pretty=True).encode("utf-8")}
  if tokenizer.kind == our_tokenizers.WordPieceTokenizer.kind:
    config["do_lower_case"] = tokenizer.lowercase
    files[VOCAB_TXT] = _read(tokenizer.path)
  else:
    files[SPM_MODEL] = _read(tokenizer.path)
  files[TOKENIZER_CONFIG] = json.dumps(config, indent=2, ensure_ascii=False).encode("utf-8")
  files[SPECIAL_TOKENS_MAP] = json.dumps(special_map, indent=2).encode("utf-8")
  return files


# ----------------------------------------------------------------------------- import

def load_folder_tokenizer(folder: str):
  """(tokenizer, special_ids) of a HuggingFace folder: its spm.model (an export of ours) or its
  WordPiece vocab.txt, with do_lower_case from tokenizer_config.json (else inferred)."""
  spm_path, vocab_path = fs.join(folder, SPM_MODEL), fs.join(folder, VOCAB_TXT)
  if fs.exists(spm_path):
    tokenizer = our_tokenizers.SentencePieceTokenizer(spm_path)
    return tokenizer, dict(tokenizer.special_ids)
  if not fs.exists(vocab_path):
    found = sorted(fs.listdir(folder))
    raise TokenizerExportError(
        f"{folder} has no {VOCAB_TXT} (a WordPiece vocabulary) or {SPM_MODEL} (a SentencePiece "
        f"model written by script_jax's export): script_jax tokenizes with one of these. Files "
        f"there: {', '.join(found) or 'none'}.")
  settings = {}
  config_path = fs.join(folder, TOKENIZER_CONFIG)
  if fs.exists(config_path):
    try:
      settings = fs.read_json(config_path)
    except ValueError as e:
      raise TokenizerExportError(f"{config_path} is not valid JSON ({e}).") from None
  lowercase = settings.get("do_lower_case")
  problems = []
  if settings.get("tokenize_chinese_chars") is False:
    problems.append("tokenize_chinese_chars=false")
  strip_accents = settings.get("strip_accents")
  if strip_accents is not None and lowercase is not None and strip_accents != lowercase:
    problems.append(f"strip_accents={strip_accents} with do_lower_case={lowercase}")
  if problems:
    raise TokenizerExportError(
        f"{config_path} sets {'; '.join(problems)}; script_jax's WordPiece tokenizer is BERT's "
        "(accents stripped exactly when lower-casing, Chinese characters split), so it would "
        "give other ids.")
  tokenizer = our_tokenizers.WordPieceTokenizer(vocab_path, lowercase=lowercase)
  return tokenizer, dict(tokenizer.special_ids)
