"""GLUE readers on small fixture files that reproduce the real files' traps, and featurization."""

from __future__ import annotations

import csv
import io
import itertools
import pathlib
import random

import numpy as np
import pytest
import tensorflow as tf

from script_jax.finetune import glue_data

# MRPC as GLUE ships it: a UTF-8 byte-order mark, a header, and sentences that open a quote
# they never close (the real dev set's second row does). Python's default csv reads a field
# that starts with '"' as quoted, running on through tabs and newlines to the next '"'.
MRPC_TRAIN = (
    "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    "1\t11\t12\tHe said the pie business doesn't fit.\t\"The pie business does not fit.\n"
    "0\t21\t22\tShares rose 5 percent.\tShares fell.\n"
    "1\t31\t32\t\"We are pleased, he said.\tHe said they were pleased.\n"
    "0\t41\t42\tThe vote was 5 to 4.\tIt passed \"narrowly\".\n")
MRPC_TRAIN_ROWS = [
    (1, "He said the pie business doesn't fit.", "\"The pie business does not fit."),
    (0, "Shares rose 5 percent.", "Shares fell."),
    (1, "\"We are pleased, he said.", "He said they were pleased."),
    (0, "The vote was 5 to 4.", "It passed \"narrowly\"."),
]
# CoLA train/dev: no header; source, label, original mark, sentence; no final newline (as the
# real dev.tsv).
COLA_DEV = ("gj04\t1\t\tThe sailors rode the breeze clear of the rocks.\n"
            "gj04\t0\t*\tThe more does Bill smoke, the more Susan hates him.\n"
            "bc01\t1\t\t\"Fiction\" is a word.")
STSB_HEADER = ("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2"
               "\tscore\n")
STSB_DEV = (STSB_HEADER
            + "0\tmain-news\tx\t2012\t0001\tnone\tnone\t\"A man is dancing.\tA man dances.\t4.750\n"
            + "1\tmain-news\tx\t2012\t0002\tnone\tnone\tA cat.\tA dog.\t0.500\n"
            + "2\tmain-news\tx\t2012\t0003\tnone\tnone\tTwo \"kids\".\tChildren.\t2.000\n")
MNLI_HEADER = "\t".join(["index", "promptID", "pairID", "genre", "s1_bp", "s2_bp", "s1_p", "s2_p",
                         "sentence1", "sentence2"])


def _mnli_row(index: int, premise: str, hypothesis: str, labels: list[str]) -> str:
  return "\t".join([str(index), "1", "1", "fiction", "(", "(", "(", "(", premise, hypothesis,
                    *labels]) + "\n"


def _write(root: pathlib.Path, folder: str, name: str, text: str) -> None:
  (root / folder).mkdir(parents=True, exist_ok=True)
  (root / folder / name).write_bytes(text.encode("utf-8"))


def _read(root, task, split, **kwargs):
  return glue_data.read_glue_split(str(root), task, split, check_counts=False, **kwargs)


def test_mrpc_quotes_and_bom_are_read_verbatim(tmp_path):
  _write(tmp_path, "MRPC", "train.tsv", MRPC_TRAIN)
  examples = _read(tmp_path, "mrpc", "train")
  assert [(e.label, e.text_a, e.text_b) for e in examples] == MRPC_TRAIN_ROWS
  assert [e.guid for e in examples] == [f"mrpc-train-{i}" for i in range(4)]

  # The fixture is a real trap: Python's default csv quoting loses rows on it.
  default_csv_rows = list(csv.reader(io.StringIO(MRPC_TRAIN.lstrip("\ufeff")), delimiter="\t"))
  assert len(default_csv_rows) - 1 < len(MRPC_TRAIN_ROWS)


def test_mrpc_bom_is_stripped_and_header_checked(tmp_path):
  # The BOM sits in MRPC's label column ("\ufeffQuality"), so the header check fails unless
  # it is stripped; a BOM-less copy must read the same.
  assert MRPC_TRAIN.encode("utf-8").startswith(b"\xef\xbb\xbf")
  _write(tmp_path / "bom", "MRPC", "dev.tsv", MRPC_TRAIN)
  _write(tmp_path / "plain", "MRPC", "dev.tsv", MRPC_TRAIN.lstrip("\ufeff"))
  examples = _read(tmp_path / "bom", "mrpc", "dev")
  assert examples == _read(tmp_path / "plain", "mrpc", "dev")
  assert not any("\ufeff" in field for e in examples for field in e[1:3])

  # A file without its header would silently lose its first row: it is refused instead.
  _write(tmp_path / "headerless", "MRPC", "dev.tsv", MRPC_TRAIN.split("\n", 1)[1])
  with pytest.raises(glue_data.GlueDataError, match=r"MRPC/dev\.tsv:1: expected a header"):
    _read(tmp_path / "headerless", "mrpc", "dev")


def test_cola_has_no_header_and_label_in_column_1(tmp_path):
  _write(tmp_path, "CoLA", "dev.tsv", COLA_DEV)
  examples = _read(tmp_path, "cola", "dev")
  assert [(e.label, e.text_a, e.text_b) for e in examples] == [
      (1, "The sailors rode the breeze clear of the rocks.", None),
      (0, "The more does Bill smoke, the more Susan hates him.", None),
      (1, "\"Fiction\" is a word.", None)]


def test_stsb_scores_are_floats_and_quotes_kept(tmp_path):
  _write(tmp_path, "STS-B", "dev.tsv", STSB_DEV)
  examples = _read(tmp_path, "STS-B", "dev")  # folder-style names are accepted too
  assert [(e.text_a, e.text_b, e.label) for e in examples] == [
      ("\"A man is dancing.", "A man dances.", 4.75), ("A cat.", "A dog.", 0.5),
      ("Two \"kids\".", "Children.", 2.0)]
  assert all(isinstance(e.label, float) for e in examples)
  default_csv_rows = list(csv.reader(io.StringIO(STSB_DEV), delimiter="\t"))
  assert len(default_csv_rows) - 1 < 3


def test_crlf_line_ends(tmp_path):
  _write(tmp_path, "RTE", "dev.tsv", "index\tsentence1\tsentence2\tlabel\r\n"
         "0\tA.\tB.\tentailment\r\n1\tC.\tD.\tnot_entailment\r\n")
  assert [(e.text_b, e.label) for e in _read(tmp_path, "rte", "dev")] == [("B.", 0), ("D.", 1)]


def test_mnli_matched_and_mismatched_dev_sets(tmp_path):
  _write(tmp_path, "MNLI", "train.tsv", MNLI_HEADER + "\tlabel1\tgold_label\n"
         + _mnli_row(0, "P0.", "H0.", ["neutral", "neutral"]))
  dev_header = MNLI_HEADER + "\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label\n"
  _write(tmp_path, "MNLI", "dev_matched.tsv", dev_header
         + _mnli_row(0, "P1.", "H1.", ["neutral"] * 4 + ["contradiction", "contradiction"]))
  _write(tmp_path, "MNLI", "dev_mismatched.tsv", dev_header
         + _mnli_row(0, "P2.", "H2.", ["neutral"] * 5 + ["entailment"]))
  # The gold label is the last field, whatever the number of annotator labels before it.
  assert _read(tmp_path, "mnli", "train")[0][1:] == ("P0.", "H0.", 1)
  assert _read(tmp_path, "mnli", "dev")[0][1:] == ("P1.", "H1.", 2)
  assert _read(tmp_path, "mnli_mm", "dev")[0][1:] == ("P2.", "H2.", 0)
  assert glue_data.eval_tasks("mnli") == ("mnli", "mnli_mm")
  assert glue_data.get_task("mnli_mm").trained_as == "mnli"
  assert "mnli_mm" not in glue_data.GLUE_MEAN_TASKS


def test_malformed_label_names_file_and_line(tmp_path):
  _write(tmp_path, "RTE", "train.tsv", "index\tsentence1\tsentence2\tlabel\n"
         "0\tA.\tB.\tentailment\n1\tC.\tD.\tmaybe\n")
  with pytest.raises(glue_data.GlueDataError, match=r"RTE/train\.tsv:3: label 'maybe'"):
    _read(tmp_path, "rte", "train")


def test_too_few_fields_names_line(tmp_path):
  _write(tmp_path, "SST-2", "dev.tsv", "sentence\tlabel\ngood .\t1\nno tab here\nbad .\t0\n")
  with pytest.raises(glue_data.GlueDataError, match=r"SST-2/dev\.tsv:3: 1 tab-separated"):
    _read(tmp_path, "sst2", "dev")


@pytest.mark.parametrize("score", ["5.5", "-0.1"])
def test_score_outside_0_to_5_names_line(tmp_path, score):
  row = "\tg\tf\ty\to\tnone\tnone\tA.\tB.\t"
  _write(tmp_path, "STS-B", "train.tsv", f"{STSB_HEADER}0{row}5.0\n1{row}{score}\n")
  with pytest.raises(glue_data.GlueDataError,
                     match=rf"STS-B/train\.tsv:3: .*{score} is outside 0-5"):
    _read(tmp_path, "stsb", "train")


def test_non_numeric_score_names_line(tmp_path):
  _write(tmp_path, "STS-B", "train.tsv", STSB_HEADER
         + "0\tg\tf\ty\to\tnone\tnone\tA.\tB.\t3.0\n1\tg\tf\ty\to\tnone\tnone\tA.\tB.\tn/a\n")
  with pytest.raises(glue_data.GlueDataError, match=r"STS-B/train\.tsv:3: .*'n/a'"):
    _read(tmp_path, "stsb", "train")


def test_row_count_is_checked_by_default(tmp_path):
  _write(tmp_path, "MRPC", "train.tsv", MRPC_TRAIN)
  with pytest.raises(glue_data.GlueDataError) as error:
    glue_data.read_glue_split(str(tmp_path), "mrpc", "train")
  message = str(error.value)
  assert "expected 3,668" in message and "found 4" in message
  assert "check_counts=False" in message
  assert len(glue_data.read_glue_split(str(tmp_path), "mrpc", "train", check_counts=False)) == 4


def test_unknown_task_split_and_missing_file(tmp_path):
  with pytest.raises(ValueError, match=r"Unknown GLUE task 'squad'.*cola, sst2, mrpc"):
    glue_data.get_task("squad")
  with pytest.raises(ValueError, match=r"Unknown split 'test'.*train, dev"):
    _read(tmp_path, "cola", "test")
  with pytest.raises(FileNotFoundError, match=r"CoLA/train\.tsv.*standard GLUE layout"):
    _read(tmp_path, "cola", "train")


def test_reads_through_tf_gfile():
  # TF's in-memory file system is reachable only through tf.io.gfile, as gs:// is: a bare
  # open() or os.path call would not find these files.
  root = "ram://glue_fixture"
  tf.io.gfile.makedirs(f"{root}/MRPC")
  with tf.io.gfile.GFile(f"{root}/MRPC/dev.tsv", "wb") as f:
    f.write(MRPC_TRAIN.encode("utf-8"))
  examples = glue_data.read_glue_split(root, "mrpc", "dev", check_counts=False)
  assert [(e.label, e.text_a, e.text_b) for e in examples] == MRPC_TRAIN_ROWS


def test_specs():
  assert glue_data.GLUE_MEAN_TASKS == ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli",
                                       "rte")
  assert {n: t.default_epochs for n, t in glue_data.TASKS.items() if t.default_epochs != 3} == {
      "stsb": 10, "rte": 10}
  assert {n for n, t in glue_data.TASKS.items() if t.swap_augment} == {"mrpc", "stsb"}
  assert glue_data.get_task("stsb").num_outputs == 1
  assert glue_data.get_task("mnli").num_outputs == 3
  assert glue_data.get_task("qqp").expected_rows == {"train": 363846, "dev": 40430}
  assert not glue_data.get_task("wnli").in_glue_mean


def test_label_order_and_text_keys_match_tfds():
  # TFDS's GLUE builder configs are plain code: this check needs no download.
  tfds_glue = pytest.importorskip("tensorflow_datasets.text.glue")
  configs = {c.name: c for c in tfds_glue.Glue.BUILDER_CONFIGS}
  for spec in glue_data.TASKS.values():
    config = configs[spec.tfds_name.split("/")[1]]
    assert set(config.text_features) == {k for k in spec.tfds_text_keys if k}, spec.name
    if spec.is_regression:
      assert config.label_classes is None
    elif spec.labels[0].isdigit():  # TFDS maps the files' "0"/"1" to ids 0/1
      assert spec.labels == tuple(str(i) for i in range(len(config.label_classes)))
    else:
      assert spec.labels == tuple(config.label_classes), spec.name


def test_examples_from_tfds():
  mnli = glue_data.examples_from_tfds("mnli_mm", [
      {"premise": b"P.", "hypothesis": b"H.", "label": np.int64(2), "idx": np.int32(7)}], "dev")
  assert mnli == [glue_data.Example("mnli_mm-dev-7", "P.", "H.", 2)]
  assert glue_data.get_task("mnli").labels[2] == "contradiction"
  stsb = glue_data.examples_from_tfds("stsb", [
      {"sentence1": "A.", "sentence2": "B.", "label": np.float32(3.2), "idx": 0}], "train")
  assert stsb[0].label == pytest.approx(3.2) and isinstance(stsb[0].label, float)
  cola = glue_data.examples_from_tfds("cola", [
      {"sentence": np.array(b"Hi."), "label": 1, "idx": 3}], "dev")
  assert cola == [glue_data.Example("cola-dev-3", "Hi.", None, 1)]
  with pytest.raises(glue_data.GlueDataError, match="label -1"):
    glue_data.examples_from_tfds("rte", [
        {"sentence1": b"A", "sentence2": b"B", "label": -1, "idx": 0}], "dev")


def test_swap_pairs_and_training_examples():
  pairs = [glue_data.Example("g0", "a0", "b0", 1), glue_data.Example("g1", "a1", "b1", 0)]
  assert glue_data.swap_pairs(pairs) == [glue_data.Example("g0-swapped", "b0", "a0", 1),
                                         glue_data.Example("g1-swapped", "b1", "a1", 0)]
  assert glue_data.training_examples("mrpc", pairs) == pairs + glue_data.swap_pairs(pairs)
  assert glue_data.training_examples("rte", pairs) == pairs
  with pytest.raises(ValueError, match="no second sentence"):
    glue_data.swap_pairs([glue_data.Example("s", "a", None, 0)])


def _bert_truncate_seq_pair(tokens_a: list, tokens_b: list, max_length: int) -> None:
  """BERT's run_classifier._truncate_seq_pair, verbatim in logic: the reference."""
  while len(tokens_a) + len(tokens_b) > max_length:
    if len(tokens_a) > len(tokens_b):
      tokens_a.pop()
    else:
      tokens_b.pop()


def test_truncated_lengths_matches_bert_loop():
  for len_a, len_b, budget in itertools.product(range(12), range(12), range(1, 14)):
    a, b = list(range(len_a)), list(range(len_b))
    _bert_truncate_seq_pair(a, b, budget)
    assert glue_data.truncated_lengths(len_a, len_b, budget) == (len(a), len(b)), (
        len_a, len_b, budget)


CLS, SEP, PAD = 101, 102, 0


def _word_encoder():
  vocab = {}
  return lambda text: [vocab.setdefault(w, 1000 + len(vocab)) for w in text.split()]


def test_featurize_pair_truncates_longest_first():
  encode = _word_encoder()
  a = "a1 a2 a3 a4 a5 a6"  # 6 tokens; B has 2; budget 10 - 3 = 7 drops A's last token
  features = glue_data.featurize([glue_data.Example("x", a, "b1 b2", 1)], encode, CLS, SEP, PAD,
                                 max_length=10)
  ids_a, ids_b = encode(a), encode("b1 b2")
  assert features["input_ids"].tolist() == [[CLS, *ids_a[:5], SEP, *ids_b, SEP]]
  assert features["segment_ids"].tolist() == [[0] * 7 + [1] * 3]
  assert features["input_mask"].tolist() == [[1] * 10]
  assert features["labels"].tolist() == [1] and features["labels"].dtype == np.int32


def test_featurize_against_reference_on_random_lengths():
  rng = random.Random(0)
  encode = _word_encoder()
  examples = []
  for i in range(200):
    words_a = [f"w{rng.randrange(50)}" for _ in range(rng.randrange(1, 20))]
    words_b = [f"w{rng.randrange(50)}" for _ in range(rng.randrange(0, 20))]
    examples.append(glue_data.Example(str(i), " ".join(words_a),
                                      " ".join(words_b) if i % 3 else None, float(i)))
  max_length = 16
  features = glue_data.featurize(examples, encode, CLS, SEP, PAD, max_length)
  for i, e in enumerate(examples):
    a = encode(e.text_a)
    if e.text_b is None:
      tokens, segments = [CLS] + a[:max_length - 2] + [SEP], [0] * min(len(a) + 2, max_length)
    else:
      b = encode(e.text_b)
      _bert_truncate_seq_pair(a, b, max_length - 3)
      tokens = [CLS] + a + [SEP] + b + [SEP]
      segments = [0] * (len(a) + 2) + [1] * (len(b) + 1)
    padding = max_length - len(tokens)
    assert features["input_ids"][i].tolist() == tokens + [PAD] * padding
    assert features["segment_ids"][i].tolist() == segments + [0] * padding
    assert features["input_mask"][i].tolist() == [1] * len(tokens) + [0] * padding
  assert features["labels"].dtype == np.float32
  assert features["labels"].tolist() == [float(i) for i in range(200)]
  assert features["input_ids"].shape == (200, max_length)
  assert features["input_ids"].dtype == np.int32

  calls = []

  def encode_batch(texts):
    calls.append(len(texts))
    return [encode(t) for t in texts]

  batched = glue_data.featurize(examples, None, CLS, SEP, PAD, max_length,
                                encode_batch=encode_batch)
  assert calls == [200, sum(e.text_b is not None for e in examples)]
  for key, value in features.items():
    np.testing.assert_array_equal(batched[key], value)


def test_featurize_single_pads_and_truncates():
  encode = _word_encoder()
  features = glue_data.featurize(
      [glue_data.Example("s", "x y", None, 0), glue_data.Example("t", "p q r s t u", None, 1)],
      encode, CLS, SEP, PAD, max_length=6)
  x, y = encode("x y")
  p, q, r, s = encode("p q r s")
  assert features["input_ids"].tolist() == [[CLS, x, y, SEP, PAD, PAD], [CLS, p, q, r, s, SEP]]
  assert features["input_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]
  assert features["segment_ids"].tolist() == [[0] * 6, [0] * 6]
