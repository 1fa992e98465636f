"""GLUE tasks: specs looked up by name, readers for the TSV files and TFDS, and featurization.

Two sources give the same `Example` lists:

  read_glue_split(data_dir, task, split)   the files of the standard GLUE release, laid out as
                                           `download_glue_data.py` leaves them:
                                           `<data_dir>/<Folder>/{train,dev}.tsv` (MNLI:
                                           `dev_matched.tsv`, `dev_mismatched.tsv`). Local or
                                           gs:// paths (all access goes through script_jax.fs).
  load_tfds_split(task, split)             TFDS `glue/<name>`; downloads on first use, so it
                                           needs the network.

Every task has the splits "train" and "dev"; the unlabelled test files are not read. MNLI has
two dev sets, so it is two tasks: "mnli" (dev = dev_matched.tsv) and "mnli_mm" (dev =
dev_mismatched.tsv). "mnli_mm" is never fine-tuned on its own: its `model_task` is "mnli", so
the model fine-tuned for "mnli" is scored on both (`eval_tasks("mnli")`). As in ELECTRA's and
the SCRIPT paper's tables, the GLUE mean covers the eight tasks of Table 2 with MNLI matched
only; "mnli_mm" and WNLI have `in_glue_mean=False`.

Data traps the reader handles (see the tests): no quote handling at all (Python's default csv
quoting swallows rows at a stray `"`: MRPC train 3,668 -> 3,570, STS-B dev 1,500 -> 1,470), the
UTF-8 byte-order mark at the start of the MRPC files, and CoLA's train/dev files having no
header (the other tasks' headers are checked, so a file without one is refused rather than
losing its first row). Row counts are checked against the standard release by default, so a silently
truncated download fails loudly; pass `check_counts=False` for subsets and custom data.
"""

from __future__ import annotations

import dataclasses
import math
import types
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np

from script_jax import cli_errors
from script_jax import fs
from script_jax.data import tfds_fetch

_BOM = "\ufeff"
SPLITS = ("train", "dev")


class GlueDataError(cli_errors.UserError):
  """Malformed or unexpected GLUE data; the message names the file, line and problem."""


class Example(NamedTuple):
  """One labelled GLUE example. `text_b` is None for single-sentence tasks (CoLA, SST-2)."""
  guid: str
  text_a: str
  text_b: Optional[str]
  label: Union[int, float]  # class id (index into the task's `labels`), or the STS-B score


REGRESSION_MAX = 5.0  # STS-B scores are in [0, 5]


@dataclasses.dataclass(frozen=True)
class GlueTask:
  """What the code needs to know about one GLUE task. Look these up with `get_task(name)`.

  Columns are 0-based field indices in the TSV; a negative index counts from the end of the
  row (MNLI's gold label is the last field, and train and dev rows differ in length).
  """
  name: str                            # key in TASKS: "cola", "mnli_mm", ...
  display_name: str                    # column title in tables: "CoLA", "MNLI-mm", ...
  folder: str                          # sub-folder of the GLUE data dir
  split_files: Mapping[str, str]       # split -> file name in `folder`
  text_a_column: int
  text_b_column: Optional[int]         # None: single-sentence task
  label_column: int
  header_label: Optional[str]          # the header's label field, checked when reading;
                                       # None: no header row (CoLA)
  labels: Optional[tuple[str, ...]]    # label strings as in the files, in TFDS's id order;
                                       # None: regression (STS-B)
  headline_metric: str                 # the one metric ELECTRA's tables report
  metrics: tuple[str, ...]             # all metrics computed (names in metrics.py)
  tfds_name: str
  tfds_splits: Mapping[str, str]       # our split -> TFDS split
  tfds_text_keys: tuple[str, Optional[str]]  # TFDS feature names of text_a, text_b
  expected_rows: Mapping[str, int]     # rows (without header) of the standard release
  default_epochs: int = 3
  swap_augment: bool = False           # also train on (B, A) pairs, as ELECTRA does
  in_glue_mean: bool = True
  model_task: Optional[str] = None     # evaluated with the model fine-tuned for this task

  @property
  def has_header(self) -> bool:
    return self.header_label is not None

  @property
  def is_regression(self) -> bool:
    return self.labels is None

  @property
  def is_pair(self) -> bool:
    return self.text_b_column is not None

  @property
  def regression_scale(self) -> float:
    """ELECTRA trains a regression on label / scale (RegressionTask: STS-B's 0-5 into [0, 1])
    and scales its predictions back; 1 for classification."""
    return REGRESSION_MAX if self.is_regression else 1.0

  @property
  def num_outputs(self) -> int:
    """Width of the classification head: the number of classes, or 1 for regression."""
    return 1 if self.labels is None else len(self.labels)

  @property
  def trained_as(self) -> str:
    """The task whose fine-tuned model is evaluated on this task's dev set."""
    return self.model_task or self.name


def _task(name: str, display_name: str, folder: str, *, columns: tuple[int, Optional[int], int],
          header_label: Optional[str], labels: Optional[tuple[str, ...]],
          metrics: tuple[str, ...], headline: str, rows: tuple[int, int],
          tfds_keys: tuple[str, Optional[str]],
          files: tuple[str, str] = ("train.tsv", "dev.tsv"), tfds_name: str = "",
          tfds_dev: str = "validation", **kwargs: Any) -> GlueTask:
  """Builds a GlueTask; the split mappings are read-only views so specs stay constant."""
  text_a, text_b, label = columns
  return GlueTask(
      name=name, display_name=display_name, folder=folder,
      split_files=types.MappingProxyType(dict(zip(SPLITS, files))),
      text_a_column=text_a, text_b_column=text_b, label_column=label,
      header_label=header_label, labels=labels, headline_metric=headline, metrics=metrics,
      tfds_name=tfds_name or f"glue/{name}",
      tfds_splits=types.MappingProxyType({"train": "train", "dev": tfds_dev}),
      tfds_text_keys=tfds_keys, expected_rows=types.MappingProxyType(dict(zip(SPLITS, rows))),
      **kwargs)


_BINARY = ("0", "1")
_NLI3 = ("entailment", "neutral", "contradiction")
_NLI2 = ("entailment", "not_entailment")

# In the column order of the paper's Table 2 (tables iterate over this dict). Label order
# follows TFDS so that TFDS's integer labels are our ids; row counts are those of the standard
# GLUE release (the same as TFDS's split sizes).
TASKS: Mapping[str, GlueTask] = types.MappingProxyType({t.name: t for t in [
    # CoLA train/dev: no header; source, label, original label, sentence.
    _task("cola", "CoLA", "CoLA", columns=(3, None, 1), header_label=None, labels=_BINARY,
          metrics=("mcc",), headline="mcc", rows=(8551, 1043), tfds_keys=("sentence", None)),
    # sentence, label.
    _task("sst2", "SST-2", "SST-2", columns=(0, None, 1), header_label="label", labels=_BINARY,
          metrics=("accuracy",), headline="accuracy", rows=(67349, 872),
          tfds_keys=("sentence", None)),
    # Quality, #1 ID, #2 ID, #1 String, #2 String.
    _task("mrpc", "MRPC", "MRPC", columns=(3, 4, 0), header_label="Quality", labels=_BINARY,
          metrics=("accuracy", "f1"), headline="accuracy", rows=(3668, 408),
          tfds_keys=("sentence1", "sentence2"), swap_augment=True),
    # index, genre, filename, year, old_index, source1, source2, sentence1, sentence2, score.
    _task("stsb", "STS-B", "STS-B", columns=(7, 8, 9), header_label="score", labels=None,
          metrics=("pearson", "spearman"), headline="spearman", rows=(5749, 1500),
          tfds_keys=("sentence1", "sentence2"), swap_augment=True, default_epochs=10),
    # id, qid1, qid2, question1, question2, is_duplicate.
    _task("qqp", "QQP", "QQP", columns=(3, 4, 5), header_label="is_duplicate", labels=_BINARY,
          metrics=("accuracy", "f1"), headline="accuracy", rows=(363846, 40430),
          tfds_keys=("question1", "question2")),
    # ... sentence1 (8), sentence2 (9), label1 [, label2 .. label5], gold_label (last).
    _task("mnli", "MNLI", "MNLI", columns=(8, 9, -1), header_label="gold_label", labels=_NLI3,
          metrics=("accuracy",), headline="accuracy", rows=(392702, 9815),
          tfds_keys=("premise", "hypothesis"), files=("train.tsv", "dev_matched.tsv"),
          tfds_dev="validation_matched"),
    # index, question, sentence, label.
    _task("qnli", "QNLI", "QNLI", columns=(1, 2, 3), header_label="label", labels=_NLI2,
          metrics=("accuracy",), headline="accuracy", rows=(104743, 5463),
          tfds_keys=("question", "sentence")),
    # index, sentence1, sentence2, label.
    _task("rte", "RTE", "RTE", columns=(1, 2, 3), header_label="label", labels=_NLI2,
          metrics=("accuracy",), headline="accuracy", rows=(2490, 277),
          tfds_keys=("sentence1", "sentence2"), default_epochs=10),
    # Not fine-tuned on its own: the "mnli" model scored on the mismatched dev set.
    _task("mnli_mm", "MNLI-mm", "MNLI", columns=(8, 9, -1), header_label="gold_label",
          labels=_NLI3, metrics=("accuracy",), headline="accuracy", rows=(392702, 9832),
          tfds_keys=("premise", "hypothesis"), files=("train.tsv", "dev_mismatched.tsv"),
          tfds_name="glue/mnli", tfds_dev="validation_mismatched", in_glue_mean=False,
          model_task="mnli"),
    # Left out of the GLUE mean, as in BERT's and ELECTRA's tables (its dev set is adversarial).
    _task("wnli", "WNLI", "WNLI", columns=(1, 2, 3), header_label="label", labels=_BINARY,
          metrics=("accuracy",), headline="accuracy", rows=(635, 71),
          tfds_keys=("sentence1", "sentence2"), in_glue_mean=False),
]})

GLUE_MEAN_TASKS = tuple(name for name, t in TASKS.items() if t.in_glue_mean)


def _normalized(name: str) -> str:
  return name.lower().replace("-", "").replace("_", "")


_BY_NORMALIZED_NAME = {_normalized(name): name for name in TASKS}


def get_task(task: Union[str, GlueTask]) -> GlueTask:
  """The spec of a task by name ("cola", "SST-2", "mnli_mm", ...); a GlueTask passes through.

  Case, "-" and "_" are ignored, so the folder names work too. Raises ValueError listing the
  known tasks for any other name.
  """
  if isinstance(task, GlueTask):
    return task
  name = _BY_NORMALIZED_NAME.get(_normalized(str(task)))
  if name is None:
    raise ValueError(f"Unknown GLUE task {task!r}; known tasks: {', '.join(TASKS)}.")
  return TASKS[name]


def eval_tasks(task: Union[str, GlueTask]) -> tuple[str, ...]:
  """The tasks whose dev sets score the model fine-tuned for `task`: ("mnli", "mnli_mm")."""
  name = get_task(task).name
  return tuple(t.name for t in TASKS.values() if t.trained_as == name)


def _check_split(spec: GlueTask, split: str) -> None:
  if split not in spec.split_files:
    raise ValueError(f"Unknown split {split!r} for GLUE task {spec.name!r}; splits: "
                     f"{', '.join(spec.split_files)} (the unlabelled test files are not read).")


def split_path(data_dir: str, task: Union[str, GlueTask], split: str) -> str:
  """Path of a split's file in the standard layout: `<data_dir>/<Folder>/<file>`."""
  spec = get_task(task)
  _check_split(spec, split)
  return fs.join(data_dir, spec.folder, spec.split_files[split])


def _count_error(spec: GlueTask, split: str, source: str, found: int) -> GlueDataError:
  expected = spec.expected_rows[split]
  return GlueDataError(
      f"{source}: expected {expected:,} {split} examples for {spec.display_name} (the standard "
      f"GLUE release), found {found:,}. The file may be truncated or a different version. If "
      f"it is a subset or custom data on purpose, skip this check with check_counts=False.")


def _score_in_range(spec: GlueTask, score: float, where: str) -> float:
  """A regression score on the task's scale (STS-B: 0 to 5); GlueDataError outside it (it
  would train towards targets the model's scale cannot reach)."""
  if not 0.0 <= score <= REGRESSION_MAX:
    raise GlueDataError(f"{where}: the {spec.display_name} score {score:g} is outside "
                        f"0-{REGRESSION_MAX:g}.")
  return score


def _parse_label(spec: GlueTask, raw: str, where: str) -> Union[int, float]:
  if spec.labels is None:
    try:
      score = float(raw)
    except ValueError:
      score = math.nan
    if not math.isfinite(score):
      raise GlueDataError(f"{where}: the {spec.display_name} score {raw!r} is not a finite "
                          "number.")
    return _score_in_range(spec, score, where)
  try:
    return spec.labels.index(raw)
  except ValueError:
    raise GlueDataError(f"{where}: label {raw!r} is not one of {list(spec.labels)} for "
                        f"{spec.display_name}.") from None


def parse_glue_tsv(text: str, task: Union[str, GlueTask], split: str,
                   source: str = "<text>") -> list[Example]:
  """Parses the text of a GLUE TSV file into examples (no count check; see read_glue_split).

  Lines are split on "\\n" and fields on "\\t" only: quotes are ordinary characters, and
  str.splitlines() is avoided because it also breaks at characters such as U+2028 that may sit
  inside a sentence. A leading byte-order mark and a "\\r" before each "\\n" are dropped.
  `source` names the file in error messages.
  """
  spec = get_task(task)
  _check_split(spec, split)
  if text.startswith(_BOM):
    text = text[len(_BOM):]
  lines = text.split("\n")
  if lines and lines[-1] == "":
    lines.pop()  # the final newline ends the last row; it does not start an empty one
  columns = [spec.text_a_column, spec.label_column]
  if spec.text_b_column is not None:
    columns.append(spec.text_b_column)
  min_fields = max(c + 1 if c >= 0 else -c for c in columns)

  first = 0
  if spec.has_header:
    # Checking the header catches a file without one (its first row would be lost) or with
    # other columns; a BOM left in place would fail it too (MRPC's label is the first field).
    header = lines[0].removesuffix("\r").split("\t") if lines else []
    found = header[spec.label_column] if len(header) >= min_fields else None
    if found != spec.header_label:
      raise GlueDataError(
          f"{source}:1: expected a header with {spec.header_label!r} in the label column "
          f"(field {spec.label_column}), found {found!r}; {spec.display_name} files of the "
          f"standard GLUE release start with a header row: {(lines or [''])[0][:80]!r}")
    first = 1
  examples = []
  for index in range(first, len(lines)):
    where = f"{source}:{index + 1}"
    fields = lines[index].removesuffix("\r").split("\t")
    if len(fields) < min_fields:
      raise GlueDataError(f"{where}: {len(fields)} tab-separated field(s), {spec.display_name} "
                          f"needs at least {min_fields}: {lines[index][:80]!r}")
    text_b = fields[spec.text_b_column] if spec.text_b_column is not None else None
    examples.append(Example(guid=f"{spec.name}-{split}-{index - first}",
                            text_a=fields[spec.text_a_column], text_b=text_b,
                            label=_parse_label(spec, fields[spec.label_column], where)))
  return examples


def read_glue_split(data_dir: str, task: Union[str, GlueTask], split: str, *,
                    check_counts: bool = True) -> list[Example]:
  """Reads one split of a GLUE task from the standard layout `<data_dir>/<Folder>/<file>`.

  Args:
    data_dir: the folder holding CoLA/, SST-2/, MRPC/ ...; local or gs://.
    task: a task name (see TASKS) or spec.
    split: "train" or "dev".
    check_counts: raise GlueDataError unless the number of rows is that of the standard GLUE
      release. Turn off for subsets and custom data.

  Returns:
    The examples in file order.

  Raises:
    FileNotFoundError: the file is missing (the message shows the expected layout).
    GlueDataError: a malformed row (file and line named), or an unexpected row count.
  """
  spec = get_task(task)
  path = split_path(data_dir, spec, split)
  if not fs.exists(path):
    raise FileNotFoundError(
        f"No {spec.display_name} {split} file at {path}. Expected the standard GLUE layout "
        f"(as download_glue_data.py writes it): {fs.join(data_dir, spec.folder)}/ "
        f"holding {', '.join(spec.split_files.values())}, with data_dir the folder above "
        f"{spec.folder}/.")
  data = fs.read_bytes(path)
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise GlueDataError(f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {e.start}).") from e
  examples = parse_glue_tsv(text, spec, split, source=path)
  if check_counts and len(examples) != spec.expected_rows[split]:
    raise _count_error(spec, split, path, len(examples))
  return examples


def _as_text(value: Any) -> str:
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray):  # a 0-d array of bytes, as tfds.as_numpy may yield
    return _as_text(value.item())
  return str(value)


def examples_from_tfds(task: Union[str, GlueTask], records: Iterable[Mapping[str, Any]],
                       split: str) -> list[Example]:
  """Converts TFDS `glue/<name>` records (dicts, text as bytes or str) into examples.

  TFDS labels are already our ids (the label lists follow TFDS's order); STS-B's are floats.
  Unlabelled records (label -1, TFDS's test splits) raise GlueDataError.
  """
  spec = get_task(task)
  _check_split(spec, split)
  key_a, key_b = spec.tfds_text_keys
  examples = []
  for n, record in enumerate(records):
    idx = int(record.get("idx", n))
    where = f"{spec.tfds_name} {spec.tfds_splits[split]} idx {idx}"
    raw_label = record["label"]
    if spec.labels is None:
      label = float(raw_label)
      if not math.isfinite(label):
        raise GlueDataError(f"{where}: score {label} is not a finite number.")
      _score_in_range(spec, label, where)
    else:
      label = int(raw_label)
      if not 0 <= label < len(spec.labels):
        raise GlueDataError(f"{where}: label {label} outside 0..{len(spec.labels) - 1} "
                            "(-1 marks TFDS's unlabelled test examples).")
    examples.append(Example(guid=f"{spec.name}-{split}-{idx}", text_a=_as_text(record[key_a]),
                            text_b=_as_text(record[key_b]) if key_b else None, label=label))
  return examples


def load_tfds_split(task: Union[str, GlueTask], split: str, *, data_dir: Optional[str] = None,
                    check_counts: bool = True) -> list[Example]:
  """Loads one split of a GLUE task from TFDS (`glue/<name>`; downloads on first use).

  TFDS has no manual-download path for GLUE, so offline use read_glue_split on the files.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (heavy: tensorflow_datasets)
  spec = get_task(task)
  _check_split(spec, split)
  dataset = tfds_fetch.load(spec.tfds_name, spec.tfds_splits[split], data_dir=data_dir,
                            instead="Or give --data_dir a folder in the GLUE layout "
                            "(<TASK>/train.tsv, dev.tsv).")
  examples = examples_from_tfds(spec, tfds.as_numpy(dataset), split)
  if check_counts and len(examples) != spec.expected_rows[split]:
    raise _count_error(spec, split, f"TFDS {spec.tfds_name}", len(examples))
  return examples


def swap_pairs(examples: Iterable[Example]) -> list[Example]:
  """The examples with text_a and text_b exchanged (guid suffixed "-swapped")."""
  swapped = []
  for e in examples:
    if e.text_b is None:
      raise ValueError(f"Example {e.guid} has no second sentence to swap.")
    swapped.append(e._replace(guid=f"{e.guid}-swapped", text_a=e.text_b, text_b=e.text_a))
  return swapped


def training_examples(task: Union[str, GlueTask], examples: Sequence[Example]) -> list[Example]:
  """Training set as ELECTRA builds it: for MRPC and STS-B, the pairs and their swaps."""
  examples = list(examples)
  return examples + swap_pairs(examples) if get_task(task).swap_augment else examples


def truncated_lengths(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
  """Lengths after longest-first truncation of a pair to `budget` tokens.

  Closed form of BERT's `_truncate_seq_pair`, which drops the last token of the longer
  sequence (of B on a tie) until the pair fits: the shorter one is untouched if the longer one
  alone can absorb the cut; otherwise both end at half the budget, A keeping the odd token.
  """
  if len_a + len_b <= budget:
    return len_a, len_b
  if 2 * min(len_a, len_b) <= budget:
    return (len_a, budget - len_a) if len_a <= len_b else (budget - len_b, len_b)
  return (budget + 1) // 2, budget // 2


def featurize(examples: Sequence[Example], encode: Optional[Callable[[str], list[int]]],
              cls_id: int, sep_id: int, pad_id: int, max_length: int, *,
              encode_batch: Optional[Callable[[list[str]], list[list[int]]]] = None
              ) -> dict[str, np.ndarray]:
  """Token ids, masks and labels of examples, padded to `max_length`.

  Singles become [CLS] A [SEP] (segment 0); pairs [CLS] A [SEP] B [SEP] with B [SEP] in
  segment 1. Pairs are truncated longest-first (`truncated_lengths`), singles from the end.

  Args:
    examples: from read_glue_split or load_tfds_split.
    encode: text -> token ids without special tokens (a tokenizer's `.encode`); may be None
      when `encode_batch` is given.
    cls_id: id of [CLS].
    sep_id: id of [SEP].
    pad_id: id written after the last real token.
    max_length: sequence length of the arrays, special tokens included.
    encode_batch: list of texts -> list of token-id lists (a tokenizer's `.encode_batch`);
      used instead of `encode` when given, since tokenizing in one call is much faster.

  Returns:
    "input_ids", "input_mask" (1 on real tokens), "segment_ids": int32 [N, max_length];
    "labels": [N], float32 if the labels are scores (STS-B), else int32.
  """
  examples = list(examples)
  has_pairs = any(e.text_b is not None for e in examples)
  if max_length < (3 if has_pairs else 2):
    raise ValueError(f"max_length={max_length} leaves no room for text after the special "
                     "tokens.")
  if encode_batch is None:
    if encode is None:
      raise ValueError("featurize needs `encode` or `encode_batch`.")
    encode_batch = lambda texts: [encode(t) for t in texts]
  ids_a = encode_batch([e.text_a for e in examples])
  ids_b_list = encode_batch([e.text_b for e in examples if e.text_b is not None])
  if len(ids_a) != len(examples) or len(ids_b_list) != sum(e.text_b is not None
                                                          for e in examples):
    raise ValueError("The encoder returned a different number of sequences than texts.")
  ids_b = iter(ids_b_list)

  n = len(examples)
  input_ids = np.full((n, max_length), pad_id, np.int32)
  input_mask = np.zeros((n, max_length), np.int32)
  segment_ids = np.zeros((n, max_length), np.int32)
  for i, e in enumerate(examples):
    a = list(ids_a[i])
    if e.text_b is None:
      tokens = [cls_id] + a[:max_length - 2] + [sep_id]
      len_first = len(tokens)
    else:
      b = list(next(ids_b))
      len_a, len_b = truncated_lengths(len(a), len(b), max_length - 3)
      tokens = [cls_id] + a[:len_a] + [sep_id] + b[:len_b] + [sep_id]
      len_first = len_a + 2
    input_ids[i, :len(tokens)] = tokens
    input_mask[i, :len(tokens)] = 1
    segment_ids[i, len_first:len(tokens)] = 1

  is_score = [isinstance(e.label, float) for e in examples]
  if any(is_score) and not all(is_score):
    raise ValueError("Examples mix class ids and regression scores.")
  labels = np.asarray([e.label for e in examples], np.float32 if any(is_score) else np.int32)
  return {"input_ids": input_ids, "input_mask": input_mask, "segment_ids": segment_ids,
          "labels": labels.reshape(n)}
