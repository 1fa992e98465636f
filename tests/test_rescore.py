"""N-best rescoring: WER against hand counts, an independent DP and jiwer; the picks of the
interpolated score; the lambda grid search; n-best files and their errors. No model here: the
PLLs come from a stand-in scorer."""

import gzip
import json

import jiwer
import numpy as np
import pytest

from script_jax.scoring import rescore
from script_jax.scoring.pll_scorer import ScoringError


def _levenshtein(a, b):
  """Word edit distance, the textbook dynamic programme (independent of jiwer)."""
  a, b = a.split(), b.split()
  d = np.arange(len(b) + 1)
  for i in range(1, len(a) + 1):
    prev, d[0] = d.copy(), i
    for j in range(1, len(b) + 1):
      d[j] = min(prev[j] + 1, d[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1]))
  return int(d[-1])


CASES = [  # (reference, hypothesis, edits counted by hand)
    ("a b c", "a x c", 1),  # substitution
    ("a b c", "a c", 1),  # deletion
    ("a b", "a b c d", 2),  # insertions
    ("the cat sat", "cat the sat", 2),
    ("", "a b", 2),
    ("a b", "", 2),
    ("", "", 0),
    ("one  two\tthree ", " one two three", 0),  # whitespace is not a word
    ("i saw the man", "eye saw a man here", 3),
]


def test_word_edits_match_hand_counts_and_an_independent_dp():
  refs, hyps, want = zip(*CASES)
  got = rescore.word_edits(refs, hyps)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(got, [_levenshtein(r, h) for r, h in zip(refs, hyps)])


def test_corpus_wer_is_total_edits_over_total_reference_words():
  refs, hyps = ["a", "a b c d"], ["b", "a b c d"]
  assert rescore.corpus_wer(refs, hyps) == pytest.approx(1 / 5)  # not the mean 0.5
  refs, hyps, _ = zip(*[c for c in CASES if c[0].strip()])
  want = sum(_levenshtein(r, h) for r, h in zip(refs, hyps)) / sum(len(r.split()) for r in refs)
  assert rescore.corpus_wer(refs, hyps) == pytest.approx(want)
  normal = lambda texts: [" ".join(t.split()) for t in texts]  # jiwer keeps tabs in words
  assert rescore.corpus_wer(refs, hyps) == pytest.approx(jiwer.wer(normal(refs), normal(hyps)))
  with pytest.raises(ScoringError, match="no words"):
    rescore.corpus_wer([""], ["a"])


def test_length_penalties():
  n = np.asarray([0, 1, 7])
  np.testing.assert_allclose(rescore.length_penalty(n, "none"), [1, 1, 1])
  np.testing.assert_allclose(rescore.length_penalty(n, "tokens"), [1, 1, 7])
  np.testing.assert_allclose(rescore.length_penalty(n, "gnmt", 1.0), [5 / 6, 1, 2])
  np.testing.assert_allclose(rescore.length_penalty(n, "gnmt", 0.5), np.sqrt([5 / 6, 1, 2]))


def _utt(uid, ref, hyps):
  """An Utterance from [(text, am score)]."""
  return rescore.Utterance(uid, ref, [t for t, _ in hyps], np.asarray([s for _, s in hyps]))


def test_rescoring_picks_the_hypothesis_the_interpolated_score_prefers():
  utts = [_utt("u1", "a b", [("a c", -1.0), ("a b", -2.0), ("a d", -4.0)]),
          _utt("u2", "x y", [("x y", -1.0)])]
  pll = {"a c": -10.0, "a b": -1.0, "a d": -0.1, "x y": -3.0}
  tokens = {"a c": 2, "a b": 2, "a d": 20, "x y": 2}
  s = rescore.build_set("dev", utts, pll, tokens)
  assert s.num_hyps == 3 and s.ref_words == 4
  np.testing.assert_array_equal(s.edits_UxH[0], [1, 0, 1])
  for lam in (0.0, 0.05, 0.2, 1.0, 5.0):
    total = [-1 + lam * -10, -2 + lam * -1, -4 + lam * -0.1]
    assert s.picks(lam)[0] == int(np.argmax(total)), lam
    assert s.picks(lam)[1] == 0  # an utterance with one hypothesis keeps it
  assert s.wer(0.0) == pytest.approx(1 / 4) and s.wer(1.0) == 0.0
  assert s.oracle_wer() == 0.0
  # Divided by |h| tokens: -5, -0.5 and -0.005 per token.
  s_tok = rescore.build_set("dev", utts, pll, tokens, kind="tokens")
  assert s_tok.picks(4.0)[0] == 1 and s.picks(4.0)[0] == 2  # -21 -4 -4.02 vs -41 -6 -4.4
  assert s_tok.picks(10.0)[0] == 2


def test_grid_search_picks_the_lambda_minimising_dev_wer():
  # u1 needs lambda > 0.5 to prefer the right "a b"; u2 turns wrong once lambda > 4/3.
  utts = [_utt("u1", "a b", [("a c", -1.0), ("a b", -2.0)]),
          _utt("u2", "x y", [("x y", -1.0), ("x z", -3.0)]),
          _utt("u3", "p q r", [("p q r", -0.5), ("p", -4.0)])]
  pll = {"a c": -5.0, "a b": -3.0, "x y": -2.0, "x z": -0.5, "p q r": -2.0, "p": -1.0}
  tokens = {t: len(t.split()) for t in pll}
  dev = rescore.build_set("dev", utts, pll, tokens)
  grid = rescore.parse_grid("0:2:0.25")
  lam, curve = rescore.grid_search(dev, grid)
  # Brute force, by the independent DP on the texts each lambda picks.
  def brute(l):
    edits = 0
    for u in utts:
      total = [a + l * pll[t] for t, a in zip(u.texts, u.am_scores)]
      edits += _levenshtein(u.ref, u.texts[int(np.argmax(total))])
    return edits / 7
  np.testing.assert_allclose([w for _, w in curve], [brute(l) for l in grid])
  assert lam == 0.75  # WER 0 on (0.5, 4/3): the smallest grid point inside
  assert dict(curve)[0.5] == pytest.approx(1 / 7)  # a tie keeps the earlier hypothesis
  assert dict(curve)[0.0] == pytest.approx(1 / 7) and dict(curve)[2.0] == pytest.approx(1 / 7)
  table = rescore.format_table([dev], lam, "critic")
  assert "baseline (1-best)" in table and "oracle (2-best)" in table
  assert "rescored (critic, lambda=0.75)" in table and "| dev " in table


def test_parse_grid():
  np.testing.assert_allclose(rescore.parse_grid("0:1:0.25"), [0, 0.25, 0.5, 0.75, 1.0])
  np.testing.assert_allclose(rescore.parse_grid("0:1:0.05")[-1], 1.0)
  assert len(rescore.parse_grid("0:1:0.05")) == 21
  np.testing.assert_allclose(rescore.parse_grid("0.3, 0.1"), [0.1, 0.3])
  for bad in ("0:1:0", "1:0:0.1", "a,b", "", "0:1"):
    with pytest.raises(ScoringError, match="--lambdas"):
      rescore.parse_grid(bad)


# ----------------------------------------------------------------------------- n-best files

NBEST = {
    "utt-b": {"hyp_2": {"score": -3.5, "text": " a cat "}, "hyp_10": {"score": -9, "text": "cat"},
              "hyp_1": {"score": -1.25, "text": "the cat"}, "ref": "the cat "},
    "utt-a": {"ref": "hello", "hyp_1": {"score": -0.5, "text": "hello"}},
}


def _write(path, obj, compress=False):
  data = (obj if isinstance(obj, str) else json.dumps(obj)).encode()
  path.write_bytes(gzip.compress(data) if compress else data)
  return str(path)


def test_load_nbest_plain_and_gz(tmp_path):
  plain = rescore.load_nbest(_write(tmp_path / "dev.json", NBEST))
  gz = rescore.load_nbest(_write(tmp_path / "dev.am.json.gz", NBEST, compress=True))
  for utts in (plain, gz):
    assert [u.id for u in utts] == ["utt-b", "utt-a"]
    assert utts[0].texts == ["the cat", "a cat", "cat"]  # hyp_1, hyp_2, hyp_10: numeric order
    np.testing.assert_allclose(utts[0].am_scores, [-1.25, -3.5, -9.0])
    assert utts[0].ref == "the cat"
  assert rescore.set_name(str(tmp_path / "dev-clean.am.json.gz")) == "dev-clean"


@pytest.mark.parametrize("content,message", [
    ("not json {", r"is not a JSON n-best file: .* line 1 column"),
    ([1, 2], "expected a JSON object"),
    ({}, "holds no utterances"),
    ({"u1": {"hyp_1": {"score": -1, "text": "a"}}}, r"utterance 'u1' has no 'ref'"),
    ({"u1": {"ref": "a"}}, r"utterance 'u1' has no hypotheses"),
    ({"u1": {"ref": "a", "hyp_1": {"text": "a"}}}, r"utterance 'u1', hyp_1: expected"),
    ({"u1": {"ref": "a", "hyp_1": {"score": -1}}}, r"utterance 'u1', hyp_1: expected"),
    ({"u1": {"ref": "a", "hyp_1": {"score": "x", "text": "a"}}}, "'score' must be a finite"),
    ({"u1": {"ref": "a", "hyp_1": {"score": -1, "text": 3}}}, "'text' must be a string"),
    ({"u1": {"ref": 5, "hyp_1": {"score": -1, "text": "a"}}}, "'ref' must be a string"),
    ({"u1": {"ref": "a", "hyp_x": {"score": -1, "text": "a"}}}, "'hyp_x' is not hyp_<number>"),
    ({"u1": ["a"]}, r"utterance 'u1' is a list"),
])
def test_bad_nbest_files_are_clear_errors(tmp_path, content, message):
  path = _write(tmp_path / "bad.json", content)
  with pytest.raises(ScoringError, match=message) as e:
    rescore.load_nbest(path)
  assert "bad.json" in str(e.value)


def test_missing_and_broken_gz_files(tmp_path):
  with pytest.raises(ScoringError, match="does not exist"):
    rescore.load_nbest(str(tmp_path / "missing.json"))
  broken = tmp_path / "broken.json.gz"
  broken.write_bytes(gzip.compress(b'{"u": 1}')[:-6])
  with pytest.raises(ScoringError, match="cannot be decompressed"):
    rescore.load_nbest(str(broken))


class _FakeScorer:
  """PLL = -(number of words not in a small lexicon) - 0.1 per word; tokens = words."""
  lexicon = {"the", "cat", "sat", "hello", "world"}

  def __init__(self):
    self.calls = []

  def score(self, texts, describe=None, progress=None):
    self.calls.append(list(texts))
    words = [t.split() for t in texts]
    pll = np.asarray([-sum(w not in self.lexicon for w in ws) - 0.1 * len(ws) for ws in words])
    return pll, np.asarray([len(ws) for ws in words])


def test_run_tunes_on_dev_and_applies_to_test(tmp_path):
  dev = {"d1": {"ref": "the cat sat", "hyp_1": {"score": -1.0, "text": "the cap sat"},
                "hyp_2": {"score": -1.5, "text": "the cat sat"}},
         "d2": {"ref": "hello world", "hyp_1": {"score": -2.0, "text": "hello world"},
                "hyp_2": {"score": -2.2, "text": "yellow world"}}}
  test = {"t1": {"ref": "the cat", "hyp_1": {"score": -1.0, "text": "a cat"},
                 "hyp_2": {"score": -1.2, "text": "the cat"},
                 "hyp_3": {"score": -9.0, "text": "the cat"}}}
  scorer = _FakeScorer()
  out = tmp_path / "report.json"
  report = rescore.run("unused", _write(tmp_path / "dev.json", dev),
                       [_write(tmp_path / "test.json.gz", test, compress=True)],
                       lambdas="0:1:0.25", output_json=str(out), scorer=scorer)
  assert len(scorer.calls) == 1 and len(scorer.calls[0]) == 6  # distinct texts, scored once
  assert report["lambda"] == 0.75  # d1 flips at lambda > 0.5; d2 never does
  wers = report["sets"]
  assert wers["dev"]["wer"] == {"baseline": pytest.approx(1 / 5), "oracle": 0.0, "rescored": 0.0}
  assert wers["test"]["wer"]["baseline"] == pytest.approx(1 / 2)
  assert wers["test"]["wer"]["rescored"] == 0.0 and wers["test"]["max_hyps"] == 3
  assert json.loads(out.read_text())["lambda"] == 0.75
  assert "rescored (critic, lambda=0.75)" in report["table"]


def test_run_checks_every_file_before_loading_a_model(tmp_path):
  dev = _write(tmp_path / "dev.json", NBEST)
  bad = _write(tmp_path / "test.json", {"u9": {"ref": "a"}})
  with pytest.raises(ScoringError, match=r"test.json: utterance 'u9' has no hypotheses"):
    rescore.run(str(tmp_path / "no_such_workdir"), dev, [bad])
  with pytest.raises(ScoringError, match="workdir .* does not exist"):
    rescore.run(str(tmp_path / "no_such_workdir"), dev, [dev])
