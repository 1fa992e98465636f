"""Tests of script_jax/data/tokenizers.py: SentencePiece (trained or given) and WordPiece."""

import io

import pytest
import sentencepiece as spm

from script_jax.data import corpus
from script_jax.data import tokenizers
from script_jax.data.corpus import DataError

# A BERT-style vocab: [PAD]=0, [unused0]=1, then [UNK]=2 ... as in BERT's, ids are not 0-4.
TINY_VOCAB = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat",
              "on", "mat", "un", "##aff", "##able", "##s", ",", ".", "hello", "world"]


def _lines():
  return [line for doc in corpus.read_documents("") for line in doc]


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("spm") / "spm.model")
  return tokenizers.train_sentencepiece(_lines(), 512, path)


def test_sentencepiece_special_ids_are_fixed(spm_model):
  assert spm_model.special_ids == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
  assert spm_model.vocab_size == 512


def test_sentencepiece_encode_decode(spm_model):
  ids = spm_model.encode("The Assert statement.")
  assert ids and all(i >= 5 for i in ids)  # no special id, no [CLS]/[SEP] added
  assert spm_model.decode(ids) == "the assert statement."  # case-folded (uncased)
  assert spm_model.encode_batch(["The Assert statement.", "x"]) == [ids, spm_model.encode("x")]
  # Text that spells a special token is plain text.
  assert not set(spm_model.encode("[CLS] [MASK] [SEP] [PAD]")) & set(range(5))
  assert spm_model.decode([2, *ids, 3, 4, 3, 0, 0]) == "[CLS] the assert statement. [SEP] " \
                                                       "[MASK] [SEP]"


def test_sentencepiece_bpe(tmp_path):
  tok = tokenizers.train_sentencepiece(_lines(), 600, str(tmp_path / "bpe.model"),
                                           model_type="bpe")
  assert tok.special_ids == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
  assert tok.vocab_size == 600


def test_load_tokenizer_round_trip(spm_model, tmp_path):
  again = tokenizers.load_tokenizer(spm_model.info)
  assert again.encode("hello world") == spm_model.encode("hello world")
  (tmp_path / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n")
  wordpiece = tokenizers.WordPieceTokenizer(str(tmp_path / "vocab.txt"))
  again = tokenizers.load_tokenizer(wordpiece.info)
  assert isinstance(again, tokenizers.WordPieceTokenizer)
  with pytest.raises(DataError, match="Unknown tokenizer type"):
    tokenizers.load_tokenizer({"type": "bytes", "path": "x"})


def test_load_tokenizer_notices_a_changed_file(spm_model):
  info = dict(spm_model.info, sha256="0" * 64)
  with pytest.raises(DataError, match="changed since the data was prepared"):
    tokenizers.load_tokenizer(info)


def test_corpus_too_small_for_vocab(tmp_path):
  with pytest.raises(DataError, match=r"too small for a SentencePiece vocab of 5000: it supports "
                                      r"at most \d+ pieces.*--config.model.vocab_size"):
    tokenizers.train_sentencepiece(["a few words", "and a few more"] * 10, 5000,
                                       str(tmp_path / "x.model"))
  with pytest.raises(DataError, match="No text"):
    tokenizers.train_sentencepiece([], 100, str(tmp_path / "y.model"))


def test_sentencepiece_model_without_special_tokens(tmp_path):
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(_lines()[:300]), model_writer=model,
                                 vocab_size=200, minloglevel=2)  # <unk>, <s>, </s>; no [CLS]...
  (tmp_path / "plain.model").write_bytes(model.getvalue())
  with pytest.raises(DataError, match=r"lacks the special tokens \['\[PAD\]', '\[CLS\]', "
                                      r"'\[SEP\]', '\[MASK\]'\]"):
    tokenizers.SentencePieceTokenizer(str(tmp_path / "plain.model"))


def test_wordpiece_tiny_vocab(tmp_path):
  (tmp_path / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n")
  tok = tokenizers.WordPieceTokenizer(str(tmp_path / "vocab.txt"))
  assert tok.special_ids == {"pad": 0, "unk": 2, "cls": 3, "sep": 4, "mask": 5}
  assert tok.vocab_size == len(TINY_VOCAB)
  assert tok.lowercase  # no upper-case token in the vocab: uncased
  v = {t: i for i, t in enumerate(TINY_VOCAB)}
  # BERT: lower-cased, accents stripped, punctuation split, greedy longest-match WordPiece.
  assert tok.encode("Hello, Wörld! Unaffable cats.") == [
      v["hello"], v[","], v["world"], v["[UNK]"], v["un"], v["##aff"], v["##able"], v["cat"],
      v["##s"], v["."]]
  assert tok.encode("[MASK]") == [v["[UNK]"], v["[UNK]"], v["[UNK]"]]  # "[", "mask", "]"
  assert tok.encode_batch(["the cat", "sat on the mat"]) == [
      [v["the"], v["cat"]], [v["sat"], v["on"], v["the"], v["mat"]]]
  assert tok.decode([v["[CLS]"], v["the"], v["cat"], v["##s"], v["[SEP]"], 0, 0]) == \
      "[CLS] the cats [SEP]"


def test_wordpiece_cased_vocab_keeps_case(tmp_path):
  (tmp_path / "vocab.txt").write_text("\n".join(TINY_VOCAB + ["Hello"]) + "\n")
  tok = tokenizers.WordPieceTokenizer(str(tmp_path / "vocab.txt"))
  assert not tok.lowercase
  assert tok.encode("Hello hello") == [len(TINY_VOCAB), TINY_VOCAB.index("hello")]


def test_wordpiece_vocab_without_special_tokens(tmp_path):
  (tmp_path / "vocab.txt").write_text("the\ncat\n[UNK]\n")
  with pytest.raises(DataError, match=r"lacks the special tokens \['\[PAD\]', '\[CLS\]', "
                                      r"'\[SEP\]', '\[MASK\]'\].*--config.data.vocab_file=''"):
    tokenizers.WordPieceTokenizer(str(tmp_path / "vocab.txt"))


def test_missing_tokenizer_file(tmp_path):
  with pytest.raises(DataError, match="does not exist"):
    tokenizers.WordPieceTokenizer(str(tmp_path / "vocab.txt"))
  with pytest.raises(DataError, match="does not exist"):
    tokenizers.SentencePieceTokenizer(str(tmp_path / "spm.model"))
