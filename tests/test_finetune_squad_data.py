"""Tests of script_jax/finetune/squad_data.py (reading, offsets, windows) and squad_answers.py
(postprocessing), with real WordPiece and SentencePiece tokenizers built in tmp_path."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from script_jax.finetune import squad_answers
from script_jax.finetune import squad_data
from script_jax.finetune import squad_official

try:
  from script_jax.data import tokenizers as tokenizers_lib
except ImportError:  # before the package was split into stages
  from script_jax import tokenizers_lib  # type: ignore[no-redef]

NORMANDY = ("The Normans (Norman: Nourmands; French: Normands) were the people who in the 10th "
            "and 11th centuries gave their name to Normandy, a region in France. Their leader, "
            "Rollo, swore fealty to King Charles III. Café Müller's naïve résumé — “quoted” — "
            "lists Zürich, Québec & São Paulo!")
WORDS = ("river city north south tower music art history team player season bowl denver "
         "broncos won super league cup final game").split()
LONG = " ".join(WORDS[(7 * i) % len(WORDS)] + ("," if i % 9 == 4 else "") for i in range(150))
LONG_ANSWER_START = LONG.index("super", len(LONG) // 2)
LONG_ANSWER = LONG[LONG_ANSWER_START:LONG.index(" ", LONG.index(" ", LONG_ANSWER_START) + 1)]

QUESTIONS = {  # id -> (question, answer text or None for impossible)
    "n1": ("In what country is Normandy located?", "France"),
    "n2": ("When were the Normans in Normandy?", "10th and 11th centuries"),
    "n3": ("Who was the leader?", "Rollo"),
    "n4": ("Whose naïve résumé?", "Café Müller's"),
    "n5": ("Which word is quoted?", "“quoted”"),
    "n6": ("Which cities does it list?", "Zürich, Québec & São Paulo!"),
    "n7": ("Who ruled the Normans in 1500?", None),
    "l1": ("What did the team win in the long season of the city by the river?", LONG_ANSWER),
    "l2": ("Which kind of cup did the river city team win?", None),
    "s1": ("What won?", "broncos"),
}


def _dataset(version: str) -> dict:
  """Three articles; version "1.1" leaves out the impossible questions."""
  contexts = {"n": NORMANDY, "l": LONG, "s": "the denver broncos won the super bowl."}
  articles = []
  for prefix, title in (("n", "Normans"), ("l", "Long"), ("s", "Short")):
    qas = []
    for qid, (question, answer) in QUESTIONS.items():
      if not qid.startswith(prefix) or (answer is None and version == "1.1"):
        continue
      context = contexts[prefix]
      # l1's answer text also occurs earlier in LONG: point at the intended one.
      answer_start = LONG_ANSWER_START if qid == "l1" else context.index(answer or "")
      answers = [] if answer is None else [{"text": answer, "answer_start": answer_start}]
      if qid == "n2":  # a second, looser gold answer
        answers.append({"text": "in the 10th and 11th centuries",
                        "answer_start": context.index("in the 10th")})
      qa = {"id": qid, "question": question, "answers": answers}
      if version == "v2.0":
        qa["is_impossible"] = answer is None
      qas.append(qa)
    articles.append({"title": title, "paragraphs": [{"context": contexts[prefix], "qas": qas}]})
  return {"version": version, "data": articles}


V1 = _dataset("1.1")
V2 = _dataset("v2.0")


def _vocab_lines():
  pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  pieces += list(".,;:!?'&()-") + [str(d) for d in range(10)] + [f"##{d}" for d in range(10)]
  pieces += [chr(c) for c in range(ord("a"), ord("z") + 1)]
  pieces += [f"##{chr(c)}" for c in range(ord("a"), ord("z") + 1)]
  pieces += ["the", "normans", "norman", "france", "rollo", "cafe", "muller", "naive", "resume",
             "zurich", "quebec", "##th", "in", "of", "what", "who", "which"] + WORDS
  return pieces


@pytest.fixture(scope="module")
def wordpiece(tmp_path_factory):
  path = tmp_path_factory.mktemp("wordpiece") / "vocab.txt"
  path.write_text("\n".join(_vocab_lines()) + "\n", encoding="utf-8")
  return tokenizers_lib.WordPieceTokenizer(str(path))


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory):
  rng = random.Random(0)
  words = (NORMANDY + " " + LONG).split() + [q for q, _ in QUESTIONS.values()]
  lines = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 15))) for _ in range(400)]
  path = tmp_path_factory.mktemp("spm") / "spm.model"
  return tokenizers_lib.train_sentencepiece(lines, 120, str(path), num_threads=1)


@pytest.fixture(params=["wordpiece", "sentencepiece"])
def tokenizer(request):
  return request.getfixturevalue(request.param)


# ----------------------------------------------------------------------------------------------
# Reading and splitting.


def test_read_squad(tmp_path):
  path = tmp_path / "dev.json"
  path.write_text(json.dumps(V2), encoding="utf-8")
  examples = squad_data.read_squad(str(path))
  assert [e.qas_id for e in examples] == list(QUESTIONS)
  n2 = examples[1]
  assert n2.question == QUESTIONS["n2"][0] and n2.context == NORMANDY and n2.title == "Normans"
  assert n2.answers == [("10th and 11th centuries", NORMANDY.index("10th")),
                        ("in the 10th and 11th centuries", NORMANDY.index("in the 10th"))]
  assert [e.qas_id for e in examples if e.is_impossible] == ["n7", "l2"]
  assert not any(e.is_impossible for e in squad_data.examples_from_dataset(V1))


def test_read_squad_reports_bad_files(tmp_path):
  with pytest.raises(squad_official.SquadDataError, match="does not exist"):
    squad_data.read_squad(str(tmp_path / "nothing.json"))
  bad = json.loads(json.dumps(V1))
  bad["data"][0]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] = "3"
  with pytest.raises(squad_official.SquadDataError, match="answer_start"):
    squad_data.examples_from_dataset(bad)


def test_split_by_articles():
  train, heldout = squad_data.split_by_articles(V2, train_fraction=0.5, seed=3)
  def titles(dataset):
    return [a["title"] for a in dataset["data"]]

  assert sorted(titles(train) + titles(heldout)) == ["Long", "Normans", "Short"]
  assert len(titles(train)) == 2 and len(titles(heldout)) == 1  # round(1.5) = 2
  assert train["version"] == heldout["version"] == "v2.0"
  # Deterministic; from examples, the same articles; another seed can differ.
  assert squad_data.split_by_articles(V2, 0.5, seed=3) == (train, heldout)
  from_examples = squad_data.split_by_articles(squad_data.examples_from_dataset(V2), 0.5, seed=3)
  assert [titles(d) for d in from_examples] == [titles(train), titles(heldout)]
  assert from_examples[1] == heldout
  assert {tuple(titles(squad_data.split_by_articles(V2, 0.5, seed=s)[1]))
          for s in range(20)} == {("Normans",), ("Long",), ("Short",)}
  # Each side gets an article even at extreme fractions; the held-out part is scorable.
  assert len(squad_data.split_by_articles(V2, 0.01)[0]["data"]) == 1
  assert len(squad_data.split_by_articles(V2, 0.99)[1]["data"]) == 1
  gold = {e.qas_id: (e.answers[0][0] if e.answers else "")
          for e in squad_data.examples_from_dataset(heldout)}
  assert squad_official.evaluate_v2(heldout, gold)["exact"] == 100.0
  with pytest.raises(ValueError, match="train_fraction"):
    squad_data.split_by_articles(V2, 1.0)


# ----------------------------------------------------------------------------------------------
# Offsets.


def test_wordpiece_offsets_index_the_original_text(wordpiece):
  text = "Café  Müller's naïve résumé, in Zürich (1990s)."
  ids, spans = squad_data.encode_with_offsets(wordpiece, text)
  assert ids == wordpiece.encode(text)
  # Lower-cased and accent-stripped for the vocab, yet the spans cover the text as written.
  vocab = {i: t for t, i in wordpiece._tok.get_vocab().items()}  # pylint: disable=protected-access
  pieces = [(vocab[i], text[s:e]) for i, (s, e) in zip(ids, spans)]
  assert pieces[:6] == [("cafe", "Café"), ("muller", "Müller"), ("'", "'"), ("s", "s"),
                        ("naive", "naïve"), ("resume", "résumé")]
  assert pieces[-3:] == [("##s", "s"), (")", ")"), (".", ".")]


def test_sentencepiece_offsets_are_characters_not_bytes(sentencepiece):
  text = "Café Müller's naïve résumé, in Zürich ½ (1990s)™ end"
  ids, spans = squad_data.encode_with_offsets(sentencepiece, text)
  assert ids == sentencepiece.encode(text)
  for (s, e), (next_s, _) in zip(spans, spans[1:] + [(len(text), len(text))]):
    assert 0 <= s < e <= len(text) and s <= next_s  # in order, never empty here
    assert not text[s].isspace() and not text[e - 1].isspace()
  covered = set().union(*(range(s, e) for s, e in spans))
  assert covered == {i for i, c in enumerate(text) if not c.isspace()}
  # Byte offsets would put "Müller" one character late (ü is two bytes) and "Zürich" three.
  starts = {s for s, _ in spans}
  assert {text.index("Müller"), text.index("naïve"), text.index("Zürich"),
          text.index("end")} <= starts
  # Characters that normalise to several pieces (NFKC: ½ -> 1⁄2, ™ -> tm) share their span.
  assert [text[s:e] for s, e in spans].count("½") >= 2
  assert [text[s:e] for s, e in spans].count("™") >= 2


def test_encode_with_offsets_rejects_other_tokenizers():
  with pytest.raises(TypeError, match="wordpiece or sentencepiece"):
    squad_data.encode_with_offsets(object(), "x")


# ----------------------------------------------------------------------------------------------
# Windows.


def _long_example():
  return next(e for e in squad_data.examples_from_dataset(V1) if e.qas_id == "l1")


@pytest.mark.parametrize("stride", [5, 16])
def test_windows_cover_the_context_and_keep_the_answer(tokenizer, stride):
  example = _long_example()
  length, max_query = 40, 6
  features = squad_data.make_features([example], tokenizer, is_training=True,
                                      max_seq_length=length, doc_stride=stride,
                                      max_query_length=max_query)
  doc_ids, doc_spans = squad_data.encode_with_offsets(tokenizer, example.context)
  question_ids = tokenizer.encode(example.question)
  assert len(question_ids) > max_query  # truncation is exercised
  question_ids = question_ids[:max_query]
  first, room = len(question_ids) + 2, length - len(question_ids) - 3
  cls, sep, pad = (tokenizer.special_ids[k] for k in ("cls", "sep", "pad"))
  expected_windows = 1 + -(-(len(doc_ids) - room) // min(stride, room))
  assert len(features) == expected_windows > 2
  answer_tokens = [t for t, (s, e) in enumerate(doc_spans)
                   if s < LONG_ANSWER_START + len(LONG_ANSWER) and e > LONG_ANSWER_START]
  covered = np.zeros(len(doc_ids), int)
  windows_with_answer = 0
  expected_with_answer = 0
  for w in range(len(features)):
    start = w * min(stride, room)
    n = min(room, len(doc_ids) - start)
    ids = features.input_ids[w]
    assert list(ids[:first]) == [cls, *question_ids, sep]
    assert list(ids[first:first + n]) == doc_ids[start:start + n]
    assert ids[first + n] == sep and (ids[first + n + 1:] == pad).all()
    assert features.input_mask[w].sum() == first + n + 1 == (features.input_mask[w] == 1).sum()
    assert list(features.segment_ids[w]) == [0] * first + [1] * (n + 1) + [0] * (
        length - first - n - 1)
    assert list(features.context_mask[w]) == [1] + [0] * (first - 1) + [1] * n + [0] * (
        length - first - n)
    assert features.token_offsets[w, first:first + n].tolist() == [
        list(s) for s in doc_spans[start:start + n]]
    assert (features.token_offsets[w, :first] == -1).all()
    assert (features.token_offsets[w, first + n:] == -1).all()
    covered[start:start + n] += 1
    expected_with_answer += start <= answer_tokens[0] and answer_tokens[-1] < start + n
    s, e = features.start_positions[w], features.end_positions[w]
    offsets = features.token_offsets[w]
    if s:
      windows_with_answer += 1
      assert first <= s <= e < first + n
      assert example.context[offsets[s, 0]:offsets[e, 1]] == LONG_ANSWER
    else:
      assert e == 0
      # No window without labels holds the whole answer.
      inside = offsets[first:first + n]
      assert not (inside[:, 0].min() <= LONG_ANSWER_START and
                  inside[:, 1].max() >= LONG_ANSWER_START + len(LONG_ANSWER))
  assert (covered >= 1).all()
  assert windows_with_answer == expected_with_answer >= (2 if stride == 5 else 1)
  assert (features.example_index == 0).all() and (features.is_impossible == 0).all()


def test_max_context_flags_follow_berts_rule(wordpiece):
  stride, room_length = 7, 40
  features = squad_data.make_features([_long_example()], wordpiece, is_training=False,
                                      max_seq_length=room_length, doc_stride=stride,
                                      max_query_length=6)
  first = 6 + 2
  room = room_length - 6 - 3
  num_doc = len(wordpiece.encode(LONG))
  starts = [w * stride for w in range(len(features))]
  owner = np.zeros(num_doc, int)
  for p in range(num_doc):  # BERT's _check_is_max_context, written out
    best = None
    for w, start in enumerate(starts):
      n = min(room, num_doc - start)
      if start <= p < start + n:
        score = min(p - start, start + n - 1 - p) + 0.01 * n
        if best is None or score > best:
          best, owner[p] = score, w
  flags = np.zeros(num_doc, int)
  for w, start in enumerate(starts):
    n = min(room, num_doc - start)
    assert features.is_max_context[w, first:first + n].tolist() == list(
        owner[start:start + n] == w)
    assert not features.is_max_context[w, :first].any()
    flags[start:start + n] += features.is_max_context[w, first:first + n]
  assert (flags == 1).all()  # each token is max-context in exactly one window
  # In the middle of a window a token has context on both sides; near its edge it does not.
  assert features.is_max_context[1, first + room // 2]
  assert not features.is_max_context[1, first]


def test_impossible_and_unplaceable_answers(wordpiece):
  examples = squad_data.examples_from_dataset(V2)
  broken = squad_data.SquadExample("x", "q?", "some text here", [("absent", 0)], False)
  features = squad_data.make_features(examples + [broken], wordpiece, is_training=False,
                                      max_seq_length=64, doc_stride=16)
  for index in (examples.index(next(e for e in examples if e.qas_id == q)) for q in ("n7", "l2")):
    rows = features.example_index == index
    assert rows.sum() >= 1 and (features.is_impossible[rows] == 1).all()
    assert (features.start_positions[rows] == 0).all() and (features.end_positions[rows] == 0).all()
  # Evaluation keeps an example whose answer is not where it says (labels 0/0); training drops it.
  assert len(examples) in features.example_index
  training = squad_data.make_features(examples + [broken], wordpiece, is_training=True,
                                      max_seq_length=64, doc_stride=16)
  assert len(examples) not in training.example_index
  assert set(training.example_index) == set(range(len(examples)))
  assert set(features.model_inputs()) == {"input_ids", "input_mask", "segment_ids",
                                          "context_mask", "start_positions", "end_positions",
                                          "is_impossible"}
  assert features.input_ids.dtype == np.int32 and features.token_offsets.shape[1:] == (64, 2)


def test_no_room_for_context_is_an_error(wordpiece):
  with pytest.raises(ValueError, match="no room"):
    squad_data.make_features(squad_data.examples_from_dataset(V1)[:1], wordpiece,
                             is_training=False, max_seq_length=8, max_query_length=64)


# ----------------------------------------------------------------------------------------------
# Postprocessing.


def _token_at(features, window, context, piece):
  """Index in the window of the context token that starts at the first `piece` in context."""
  char = context.index(piece)
  return int(np.flatnonzero(features.token_offsets[window, :, 0] == char)[0])


def test_postprocess_picks_the_best_valid_span(wordpiece):
  example = squad_data.SquadExample("q", "Whose résumé?", NORMANDY, [], False)
  features = squad_data.make_features([example], wordpiece, is_training=False,
                                      max_seq_length=256)
  assert len(features) == 1
  start = np.zeros((1, 256))
  end = np.zeros((1, 256))

  def at(piece):
    return _token_at(features, 0, NORMANDY, piece)

  start[0, 1] = end[0, 1] = 100.0  # a question token: never an answer
  start[0, 0] = end[0, 0] = 50.0  # [CLS]: "no answer", not a span
  start[0, at("Müller")] = 5.0
  end[0, at("Müller") + 2] = 5.0  # Müller ' s -> "Müller's", score 10
  start[0, at("Zürich")] = 8.0  # with any end within 4 tokens: 8 + 0 < 10
  end[0, at("Café")] = 9.0  # before both starts: end < start
  end[0, at("!")] = 7.0  # Zürich , Québec & São Paulo ! : over max_answer_length
  predictions, na_probs = squad_answers.postprocess([example], features, start, end,
                                                    max_answer_length=4)
  assert predictions == {"q": "Müller's"} and na_probs is None
  # With room for longer answers, Zürich ... "!" (8 + 7 = 15) wins, punctuation included.
  predictions, _ = squad_answers.postprocess([example], features, start, end, max_answer_length=30)
  assert predictions == {"q": "Zürich, Québec & São Paulo!"}
  # Taking only the best start and end, no valid pair: "" (no answer to give).
  predictions, _ = squad_answers.postprocess([example], features, start, end, n_best=1)
  assert predictions == {"q": ""}


def test_postprocess_requires_the_start_in_its_max_context_window(wordpiece):
  example = _long_example()
  features = squad_data.make_features([example], wordpiece, is_training=False,
                                      max_seq_length=40, doc_stride=8, max_query_length=6)
  # A token that sits in windows 0 and 1 but has its max context in window 1.
  token = next(t for t in range(8, 40) if features.token_offsets[0, t, 0] >= 0 and
               not features.is_max_context[0, t] and features.is_max_context[1, t - 8])
  start = np.zeros(features.input_ids.shape)
  end = np.zeros(features.input_ids.shape)
  start[0] = -100.0  # in window 0 only `token` may start ...
  start[0, token] = end[0, token] = 10.0  # ... and it is rejected: not its max-context window
  other = 8 + 15
  assert features.is_max_context[1, other]
  start[1, other] = end[1, other] = 1.0
  predictions, _ = squad_answers.postprocess([example], features, start, end)
  s, e = features.token_offsets[1, other]
  assert predictions == {"l1": LONG[s:e]}
  assert LONG[s:e] != LONG[slice(*features.token_offsets[0, token])]


def test_postprocess_no_answer_probability(wordpiece):
  examples = squad_data.examples_from_dataset(V2)
  features = squad_data.make_features(examples, wordpiece, is_training=False,
                                      max_seq_length=40, doc_stride=8, max_query_length=6)
  start = np.zeros(features.input_ids.shape)
  end = np.zeros(features.input_ids.shape)
  long_rows = np.flatnonzero(features.example_index == [e.qas_id for e in examples].index("l1"))
  # l1: the best span scores 2 + 2 = 4 in its max-context window; null = min over windows of
  # start[CLS] + end[CLS] = min(6, 1, 1, ...) = 1, so na_prob = sigmoid(1 - 4).
  start[long_rows, 0] = end[long_rows, 0] = 0.5
  start[long_rows[0], 0] = end[long_rows[0], 0] = 3.0
  w = long_rows[1]
  token = int(np.flatnonzero(features.is_max_context[w])[0])
  start[w, token] = end[w, token] = 2.0
  predictions, na_probs = squad_answers.postprocess(examples, features, start, end, version="2.0")
  assert na_probs["l1"] == pytest.approx(1 / (1 + np.exp(3.0)))
  assert predictions["l1"] == LONG[slice(*features.token_offsets[w, token])]
  assert set(predictions) == set(na_probs) == set(QUESTIONS)
  # An answerability head's logit (higher = no answer) replaces the null score: min over windows.
  no_answer = np.full(len(features), 4.0)
  no_answer[long_rows[-1]] = -1.5
  _, na_probs = squad_answers.postprocess(examples, features, start, end, no_answer, version="2.0")
  assert na_probs["l1"] == pytest.approx(1 / (1 + np.exp(1.5)))
  assert na_probs["n1"] == pytest.approx(1 / (1 + np.exp(-4.0)))
  # The threshold turns predictions into "" only where na_prob exceeds it.
  blanked = squad_answers.with_no_answers(predictions, na_probs)
  assert blanked["l1"] == predictions["l1"] and blanked["n1"] == ""


def _one_hot_logits(features, value=10.0):
  rows = np.arange(len(features))
  start = np.zeros(features.input_ids.shape, np.float32)
  end = np.zeros(features.input_ids.shape, np.float32)
  start[rows, features.start_positions] = value
  end[rows, features.end_positions] = value
  return start, end


# With small windows every long context is cut several times. (A window of 53 context tokens
# and a stride of 8 put each token's max-context window within 4 of its middle, so that window
# holds any answer of up to ~22 tokens that starts there: BERT's max-context rule loses answers
# only when the window that best holds their start cuts them off.)
@pytest.mark.parametrize("max_seq_length, doc_stride", [(384, 128), (64, 8)])
def test_gold_positions_round_trip_to_full_marks(tokenizer, max_seq_length, doc_stride):
  for dataset in (V1, V2):
    version = squad_official.dataset_version(dataset)
    examples = squad_data.examples_from_dataset(dataset)
    features = squad_data.make_features(examples, tokenizer, is_training=False,
                                        max_seq_length=max_seq_length, doc_stride=doc_stride,
                                        max_query_length=8)
    if max_seq_length == 64:
      assert len(features) > 2 * len(examples)
    start, end = _one_hot_logits(features)
    predictions, na_probs = squad_answers.postprocess(examples, features, start, end,
                                                      version=version)
    answerable = {e.qas_id: e.answers[0][0] for e in examples if not e.is_impossible}
    assert {q: predictions[q] for q in answerable} == answerable  # exact text, accents and all
    if version == "1.1":
      assert squad_official.evaluate_v1(dataset, predictions) == {"exact_match": 100.0, "f1": 100.0}
    else:
      scores = squad_official.evaluate_v2(dataset, predictions, na_probs,
                                          squad_answers.DEFAULT_NA_PROB_THRESH)
      assert scores["exact"] == scores["f1"] == scores["best_exact"] == 100.0
      blanked = squad_answers.with_no_answers(predictions, na_probs)
      assert squad_official.evaluate_v2(dataset, blanked)["exact"] == 100.0


def test_postprocess_joint_picks_the_best_valid_beam_pair(wordpiece):
  example = squad_data.SquadExample("q", "Whose résumé?", NORMANDY, [], False)
  features = squad_data.make_features([example], wordpiece, is_training=False,
                                      max_seq_length=256)

  def at(piece):
    return _token_at(features, 0, NORMANDY, piece)

  # Beam of 3 starts, each with its 3 best ends (ELECTRA's layout), as log-probabilities.
  start_index = np.array([[1, at("Zürich"), at("Müller")]])  # 1: a question token, never valid
  start_lp = np.array([[-0.1, -1.0, -2.0]])
  end_index = np.array([[[at("Müller") + 2, at("!"), at("Café")],
                         [at("!"), at("Café"), at("Zürich")],  # too long, end < start, ok
                         [at("Müller") + 2, at("Müller"), at("!")]]])
  end_lp = np.array([[[0.0, 0.0, 0.0], [-0.1, -0.2, -3.0], [-0.5, -0.6, -0.7]]])
  beams = (start_lp, start_index, end_lp, end_index, np.array([0.0]))
  predictions, na_probs = squad_answers.postprocess_joint([example], features, *beams,
                                                          max_answer_length=4)
  assert predictions == {"q": "Müller's"} and na_probs is None  # -2.0 - 0.5 beats -1 - 3
  predictions, _ = squad_answers.postprocess_joint([example], features, *beams)
  assert predictions == {"q": "Zürich, Québec & São Paulo!"}  # -1.1, allowed at 30 tokens
  predictions, _ = squad_answers.postprocess_joint([example], features, *beams, n_best=1)
  assert predictions == {"q": ""}  # only the question token's pair is left
  _, na_probs = squad_answers.postprocess_joint([example], features, *beams[:4],
                                                np.array([1.25]), version="2.0")
  assert na_probs == {"q": pytest.approx(1 / (1 + np.exp(-1.25)))}


def test_postprocess_joint_gold_beams_round_trip_to_full_marks(wordpiece):
  for dataset in (V1, V2):
    version = squad_official.dataset_version(dataset)
    examples = squad_data.examples_from_dataset(dataset)
    features = squad_data.make_features(examples, wordpiece, is_training=False,
                                        max_seq_length=64, doc_stride=8, max_query_length=8)
    n = len(features)
    # The gold span first in every window's beam, a decoy (the [CLS] token) second.
    start_index = np.stack([features.start_positions, np.zeros(n, int)], axis=1)
    start_lp = np.tile([-0.5, -1.0], (n, 1))
    end_index = np.zeros((n, 2, 2), int)
    end_index[:, 0, 0] = features.end_positions
    end_lp = np.full((n, 2, 2), -2.0)
    end_lp[:, 0, 0] = -0.5
    answerable = np.where(features.is_impossible > 0, 3.0, -3.0)
    predictions, na_probs = squad_answers.postprocess_joint(
        examples, features, start_lp, start_index, end_lp, end_index, answerable,
        version=version)
    answerable_qs = {e.qas_id: e.answers[0][0] for e in examples if not e.is_impossible}
    assert {q: predictions[q] for q in answerable_qs} == answerable_qs
    if version == "2.0":
      scores = squad_official.evaluate_v2(dataset, predictions, na_probs,
                                          squad_answers.DEFAULT_NA_PROB_THRESH)
      assert scores["exact"] == scores["f1"] == 100.0
