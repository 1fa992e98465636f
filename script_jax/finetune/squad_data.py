"""SQuAD data: reading the official JSON into examples and cutting them into fixed-length
windows of token ids, with each token's character span in its context.

  read_squad(path) / examples_from_dataset(json)   -> [SquadExample]   (v1.1 or v2.0 files)
  load_tfds_squad(name, split)                      -> dataset dict in the official format, from
                                                       TFDS `squad/v1.1` or `squad/v2.0`
  split_by_articles(source, train_fraction, seed)   -> (train_json, heldout_json): a development
                                                       split of one file, whole articles apart
  encode_with_offsets(tokenizer, text)              -> (ids, [(char_start, char_end)])
  make_features(examples, tokenizer, is_training=)  -> SquadFeatures: fixed-length windows

Turning a model's logits over these windows back into answer text (n-best spans, no-answer
probabilities and thresholds) is squad_answers.py.

Window layout (BERT/ELECTRA): [CLS] question [SEP] context [SEP], padded to max_seq_length. The
question keeps its first max_query_length tokens. A context longer than the room left is cut into
overlapping windows whose starts are `doc_stride` tokens apart (BERT's meaning of the stride: the
step, not the overlap). Position 0, [CLS], is the "no answer here" target: start = end = 0 for
an impossible question and for a window that does not hold the whole answer.

Each window keeps its context tokens' character spans (`token_offsets`), so that an answer's
text can be cut from the original context rather than detokenized.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from absl import logging
import numpy as np
from sentencepiece import sentencepiece_pb2

from script_jax.data import tfds_fetch
from script_jax.finetune import squad_official

NO_ANSWER_INDEX = 0  # [CLS]: the start/end target when a window holds no answer


@dataclasses.dataclass
class SquadExample:
  """One question with its paragraph.

  `answers` are (text, char_start) pairs into `context`; training uses the first. `title` names
  the article (split_by_articles groups by it).
  """
  qas_id: str
  question: str
  context: str
  answers: list[tuple[str, int]]
  is_impossible: bool
  title: str = ""


# ----------------------------------------------------------------------------------------------
# Reading and splitting.


def examples_from_dataset(dataset_json: Mapping[str, Any]) -> list[SquadExample]:
  """The questions of a SQuAD dataset dict (v1.1 or v2.0), in file order.

  Raises squad_official.SquadDataError when the dict is not shaped like SQuAD.
  """
  examples = []
  for article, paragraph, qa in squad_official.iter_questions(dataset_json):
    if not isinstance(qa.get("question"), str):
      raise squad_official.SquadDataError(f'question {qa["id"]} has no "question" string')
    answers = []
    for answer in qa["answers"]:
      start = answer.get("answer_start")
      if not isinstance(start, int) or isinstance(start, bool):
        raise squad_official.SquadDataError(f'an answer of question {qa["id"]} has no integer '
                                            '"answer_start"')
      answers.append((answer["text"], start))
    examples.append(SquadExample(
        qas_id=qa["id"], question=qa["question"], context=paragraph["context"],
        answers=answers, is_impossible=bool(qa.get("is_impossible", False)),
        title=str(article.get("title", ""))))
  return examples


def read_squad(path: str) -> list[SquadExample]:
  """Reads an official SQuAD JSON file (local or gs://) into examples."""
  return examples_from_dataset(squad_official.load_json(path, "SQuAD file"))


def _dataset_from_examples(examples: Sequence[SquadExample],
                           version: Optional[str] = None) -> dict:
  """Regroups examples into a dataset dict: articles by title, paragraphs by context.

  `version` ("1.1" or "v2.0") defaults to 2.0 iff an example is impossible.
  """
  articles: dict[str, dict[str, list]] = {}
  for ex in examples:
    qas = articles.setdefault(ex.title, {}).setdefault(ex.context, [])
    qas.append({"id": ex.qas_id, "question": ex.question, "is_impossible": ex.is_impossible,
                "answers": [{"text": t, "answer_start": s} for t, s in ex.answers]})
  if version is None:
    version = "v2.0" if any(ex.is_impossible for ex in examples) else "1.1"
  return {"version": version, "data": [
      {"title": title, "paragraphs": [{"context": c, "qas": q} for c, q in paragraphs.items()]}
      for title, paragraphs in articles.items()]}


TFDS_NAMES = ("squad/v1.1", "squad/v2.0")
TFDS_SPLITS = {"train": "train", "dev": "validation"}  # our split -> TFDS's


def _as_text(value: Any) -> str:
  if isinstance(value, np.ndarray):  # a 0-d array, as tfds.as_numpy may yield
    value = value.item()
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def dataset_from_tfds(records: Iterable[Mapping[str, Any]], name: str) -> dict:
  """TFDS `squad/v1.1` or `squad/v2.0` records (text as bytes or str) as an official-format
  dataset dict, so that training, scoring and the written eval file are those of the JSON path.

  TFDS yields one record per question (answers as parallel `text`/`answer_start` lists), in its
  own order; questions are regrouped into articles by title and paragraphs by context, in order
  of first appearance. Raises squad_official.SquadDataError on records not shaped like SQuAD.
  """
  if name not in TFDS_NAMES:
    raise squad_official.SquadDataError(f"Unknown TFDS SQuAD dataset {name!r}: use one of "
                                        f"{', '.join(TFDS_NAMES)}.")
  examples = []
  for n, record in enumerate(records):
    try:
      qas_id = _as_text(record["id"])
      texts = [_as_text(t) for t in record["answers"]["text"]]
      starts = [int(s) for s in record["answers"]["answer_start"]]
      if len(texts) != len(starts):
        raise squad_official.SquadDataError(f"{len(texts)} answer texts but {len(starts)} starts")
      examples.append(SquadExample(
          qas_id=qas_id, question=_as_text(record["question"]),
          context=_as_text(record["context"]), answers=list(zip(texts, starts)),
          is_impossible=bool(record.get("is_impossible", False)),
          title=_as_text(record.get("title", ""))))
    except (KeyError, TypeError, ValueError, squad_official.SquadDataError) as e:
      raise squad_official.SquadDataError(f"TFDS {name} record {n}: not a SQuAD question "
                                          f"({type(e).__name__}: {e}).") from None
  return _dataset_from_examples(examples, version="v2.0" if name.endswith("2.0") else "1.1")


def load_tfds_squad(name: str, split: str, *, data_dir: Optional[str] = None) -> dict:
  """One split ("train" or "dev") of TFDS `squad/v1.1` or `squad/v2.0` (downloads on first
  use; `data_dir` is TFDS's folder, local or gs://) as an official-format dataset dict."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (heavy: tensorflow_datasets)
  if name not in TFDS_NAMES:
    raise squad_official.SquadDataError(f"Unknown TFDS SQuAD dataset {name!r}: use one of "
                                        f"{', '.join(TFDS_NAMES)}.")
  if split not in TFDS_SPLITS:
    raise ValueError(f"split must be one of {sorted(TFDS_SPLITS)}, not {split!r}.")
  dataset = tfds_fetch.load(name, TFDS_SPLITS[split], data_dir=data_dir,
                            instead="Or give --train_file and --dev_file (the official JSON).")
  return dataset_from_tfds(tfds.as_numpy(dataset), name)


def split_by_articles(source: Union[Mapping[str, Any], Sequence[SquadExample]],
                      train_fraction: float = 0.8, seed: int = 0) -> tuple[dict, dict]:
  """Splits one SQuAD set into (train, held-out) dataset dicts, whole articles on each side.

  For a development split when only the dev file is at hand: questions about one article share
  its paragraphs, so splitting by question would leak contexts into training.

  Args:
    source: a dataset dict (as in the JSON file) or examples (regrouped by title and context;
      version "v2.0" if any is impossible, else "1.1").
    train_fraction: share of the articles that go to training, in (0, 1); both sides get at
      least one article.
    seed: which articles; the same seed gives the same split.

  Returns:
    Two dataset dicts (copies) with the source's version, articles in their original order,
    ready for `examples_from_dataset` and `squad_official.evaluate_v1/v2`.
  """
  if not 0.0 < train_fraction < 1.0:
    raise ValueError(f"train_fraction must be in (0, 1), not {train_fraction}")
  if isinstance(source, Mapping):
    for _ in squad_official.iter_questions(source):  # only to check the shape
      pass
    dataset = source
  else:
    dataset = _dataset_from_examples(source)
  articles = dataset["data"]
  if len(articles) < 2:
    raise ValueError(f"{len(articles)} article(s): a split by articles needs at least 2")
  num_train = min(max(round(len(articles) * train_fraction), 1), len(articles) - 1)
  order = np.random.default_rng(seed).permutation(len(articles))
  in_train = np.zeros(len(articles), bool)
  in_train[order[:num_train]] = True

  def subset(keep):
    return {"version": dataset.get("version", "1.1"),
            "data": [copy.deepcopy(a) for a, k in zip(articles, in_train) if k == keep]}

  return subset(True), subset(False)


# ----------------------------------------------------------------------------------------------
# Tokens with character offsets.


def _sentencepiece_spans(sp, text: str) -> tuple[list[int], list[tuple[int, int]]]:
  """Ids and character spans of SentencePiece pieces (their proto gives UTF-8 byte offsets)."""
  if hasattr(sp, "encode_as_immutable_proto"):  # sentencepiece 0.1.99-0.2.0
    proto = sp.encode_as_immutable_proto(text)
  else:  # later versions return the protobuf message itself
    proto = sp.encode_as_proto(text)
  if isinstance(proto, bytes):
    message = sentencepiece_pb2.SentencePieceText()
    message.ParseFromString(proto)
    proto = message
  data = np.frombuffer(text.encode("utf-8"), np.uint8)
  is_first_byte = (data & 0xC0) != 0x80  # UTF-8 continuation bytes are 10xxxxxx
  byte_to_char = np.append(np.cumsum(is_first_byte) - 1, len(text))
  ids = [p.id for p in proto.pieces]
  spans = [(int(byte_to_char[p.begin]), int(byte_to_char[p.end])) for p in proto.pieces]
  return ids, spans


def _tidy_spans(text: str, spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
  """Trims whitespace off each span, then lets an empty span take the span of the token after it.

  SentencePiece's spans include the space that "▁" stands for, a piece of whitespace alone
  ("▁") covers no text, and a character that normalises to several pieces ("½" -> "1⁄2")
  gives all but the last an empty span. Sharing the next token's span keeps every token usable
  as an answer boundary and the answer text exact.
  """
  tidy = []
  for start, end in spans:
    while start < end and text[start].isspace():
      start += 1
    while end > start and text[end - 1].isspace():
      end -= 1
    tidy.append([start, end])
  for i in range(len(tidy) - 2, -1, -1):
    if tidy[i][0] == tidy[i][1] and tidy[i + 1][0] == tidy[i][0]:
      tidy[i][1] = tidy[i + 1][1]
  return [(s, e) for s, e in tidy]


def encode_with_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
  """Token ids of `text` (as tokenizer.encode) and each token's (char_start, char_end) in `text`.

  `tokenizer` is duck-typed on the project's tokenizers: kind "wordpiece" with a Hugging Face
  `tokenizers.Tokenizer` in `._tok` (its offsets index the original string even through the
  BERT normaliser's lower-casing and accent stripping), or kind "sentencepiece" with a
  SentencePieceProcessor in `._sp` (byte offsets, converted to characters). Spans carry no
  leading or trailing whitespace; a token of whitespace alone shares the next token's span and
  only at the very end of the text is a span empty.
  """
  kind = getattr(tokenizer, "kind", None)
  if kind == "wordpiece":
    # pylint: disable-next=protected-access
    encoding = tokenizer._tok.encode(text, add_special_tokens=False)
    ids, spans = list(encoding.ids), list(encoding.offsets)
  elif kind == "sentencepiece":
    ids, spans = _sentencepiece_spans(tokenizer._sp, text)  # pylint: disable=protected-access
  else:
    raise TypeError(f"encode_with_offsets needs a wordpiece or sentencepiece tokenizer of "
                    f"script_jax, not {type(tokenizer).__name__} (kind {kind!r})")
  return ids, _tidy_spans(text, spans)


# ----------------------------------------------------------------------------------------------
# Windows.


@dataclasses.dataclass
class SquadFeatures:
  """N windows of length L, as numpy arrays (int32 unless said).

  Model inputs and labels (see `model_inputs`):
    input_ids, input_mask, segment_ids [N, L]: segment 0 = [CLS] question [SEP], 1 = context
      and the last [SEP].
    context_mask [N, L]: 1 where a start/end logit may point: the window's context tokens and
      [CLS] (index NO_ANSWER_INDEX, the no-answer target), as ELECTRA's answer mask.
    start_positions, end_positions [N]: the answer's first/last token in the window, or 0/0
      when the question is impossible or the window does not hold the whole answer.
    is_impossible [N]: the question's label, the same on all its windows (as ELECTRA trains its
      answerability classifier).
  Bookkeeping for `squad_answers.postprocess`:
    example_index [N]: which example (index into the list given to make_features).
    token_offsets [N, L, 2]: (char_start, char_end) in the example's context of each context
      token, -1 elsewhere.
    is_max_context [N, L] bool: the token has more context on both sides here than in any other
      window of its example (BERT's rule); a predicted span must start at such a token.
  """
  input_ids: np.ndarray
  input_mask: np.ndarray
  segment_ids: np.ndarray
  context_mask: np.ndarray
  start_positions: np.ndarray
  end_positions: np.ndarray
  is_impossible: np.ndarray
  example_index: np.ndarray
  token_offsets: np.ndarray
  is_max_context: np.ndarray

  def __len__(self) -> int:
    return len(self.input_ids)

  def model_inputs(self) -> dict[str, np.ndarray]:
    """The arrays a model and its loss read, by name."""
    return {name: getattr(self, name) for name in (
        "input_ids", "input_mask", "segment_ids", "context_mask", "start_positions",
        "end_positions", "is_impossible")}


def _window_starts(num_tokens: int, room: int, doc_stride: int) -> list[int]:
  """BERT's sliding windows: starts `doc_stride` apart until one reaches the end (>= 1 window)."""
  starts = [0]
  while starts[-1] + room < num_tokens:
    starts.append(starts[-1] + min(room, doc_stride))
  return starts


def _max_context_window(starts: Sequence[int], room: int, num_tokens: int) -> np.ndarray:
  """For each context token, the window where it has the most context (BERT's scoring:
  min(tokens left, tokens right) + 0.01 * window length; the first window wins ties)."""
  position = np.arange(num_tokens)
  scores = np.full((len(starts), num_tokens), -np.inf)
  for w, start in enumerate(starts):
    length = min(room, num_tokens - start)
    inside = (position >= start) & (position < start + length)
    score = np.minimum(position - start, start + length - 1 - position) + 0.01 * length
    scores[w, inside] = score[inside]
  return np.argmax(scores, axis=0)


def _answer_tokens(example: SquadExample, offsets: np.ndarray) -> Optional[tuple[int, int]]:
  """First and last context token of the first answer, or None if it cannot be placed."""
  if example.is_impossible or not example.answers:
    return None
  text, char_start = example.answers[0]
  char_end = char_start + len(text)
  if not text.strip() or example.context[char_start:char_end] != text:
    return None
  overlap = ((offsets[:, 1] > offsets[:, 0]) & (offsets[:, 0] < char_end) &
             (offsets[:, 1] > char_start))
  tokens = np.flatnonzero(overlap)
  if not len(tokens):
    return None
  return int(tokens[0]), int(tokens[-1])


def make_features(examples: Sequence[SquadExample], tokenizer, *, is_training: bool,
                  max_seq_length: int = 512, doc_stride: int = 128,
                  max_query_length: int = 64) -> SquadFeatures:
  """Cuts every example into windows [CLS] question [SEP] context [SEP] (see SquadFeatures).

  Args:
    examples: from read_squad / examples_from_dataset.
    tokenizer: a script_jax tokenizer (see encode_with_offsets); its special_ids give [CLS],
      [SEP] and [PAD].
    is_training: training drops (and logs the count of) answerable examples whose first answer is
      not found at its char_start in the context; evaluation keeps every example, so every
      question gets a prediction. Labels are filled in either way.
    max_seq_length: L, the window length (ELECTRA: 512; BERT's SQuAD runs: 384).
    doc_stride: tokens between the starts of consecutive windows of one context.
    max_query_length: the question keeps at most this many tokens.

  Returns:
    SquadFeatures, the windows of each example in order, examples in the order given.
  """
  if doc_stride < 1:
    raise ValueError(f"doc_stride must be >= 1, not {doc_stride}")
  cls_id, sep_id, pad_id = (tokenizer.special_ids[k] for k in ("cls", "sep", "pad"))
  contexts: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # dev questions share paragraphs
  rows = collections.defaultdict(list)
  skipped = 0
  for index, example in enumerate(examples):
    question_ids = tokenizer.encode(example.question)[:max_query_length]
    if example.context not in contexts:
      ids, spans = encode_with_offsets(tokenizer, example.context)
      contexts[example.context] = (np.asarray(ids, np.int32),
                                   np.asarray(spans, np.int32).reshape(-1, 2))
    context_ids, offsets = contexts[example.context]
    answer = _answer_tokens(example, offsets)
    if is_training and answer is None and not example.is_impossible:
      skipped += 1
      continue
    room = max_seq_length - len(question_ids) - 3
    if room < 1:
      raise ValueError(f"max_seq_length {max_seq_length} leaves no room for context after a "
                       f"question of {len(question_ids)} tokens; lower max_query_length")
    starts = _window_starts(len(context_ids), room, doc_stride)
    best_window = _max_context_window(starts, room, len(context_ids))
    first = len(question_ids) + 2  # where the context begins in a window
    for w, start in enumerate(starts):
      length = min(room, len(context_ids) - start)
      ids = np.full(max_seq_length, pad_id, np.int32)
      ids[:first + length + 1] = np.concatenate(
          [[cls_id], question_ids, [sep_id], context_ids[start:start + length], [sep_id]])
      in_context = slice(first, first + length)
      segment_ids = np.zeros(max_seq_length, np.int32)
      segment_ids[first:first + length + 1] = 1
      context_mask = np.zeros(max_seq_length, np.int32)
      context_mask[in_context] = 1
      context_mask[NO_ANSWER_INDEX] = 1
      token_offsets = np.full((max_seq_length, 2), -1, np.int32)
      token_offsets[in_context] = offsets[start:start + length]
      is_max_context = np.zeros(max_seq_length, bool)
      is_max_context[in_context] = best_window[start:start + length] == w
      start_position = end_position = NO_ANSWER_INDEX
      if answer is not None and start <= answer[0] and answer[1] < start + length:
        start_position, end_position = (first + answer[0] - start, first + answer[1] - start)
      rows["input_ids"].append(ids)
      rows["input_mask"].append((np.arange(max_seq_length) < first + length + 1).astype(np.int32))
      rows["segment_ids"].append(segment_ids)
      rows["context_mask"].append(context_mask)
      rows["start_positions"].append(start_position)
      rows["end_positions"].append(end_position)
      rows["is_impossible"].append(int(example.is_impossible))
      rows["example_index"].append(index)
      rows["token_offsets"].append(token_offsets)
      rows["is_max_context"].append(is_max_context)
  if skipped:
    logging.warning("SQuAD features: dropped %d of %d training examples whose answer text is "
                    "not at its answer_start in the context", skipped, len(examples))
  length = (max_seq_length,)
  trailing = {"token_offsets": length + (2,), "start_positions": (), "end_positions": (),
              "is_impossible": (), "example_index": ()}
  return SquadFeatures(**{
      f.name: np.asarray(rows[f.name], bool if f.name == "is_max_context" else np.int32)
      .reshape((-1,) + trailing.get(f.name, length)) for f in dataclasses.fields(SquadFeatures)})
