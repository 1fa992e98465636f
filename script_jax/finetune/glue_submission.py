"""GLUE's unlabelled test sets: reading them, and writing predictions in the benchmark's format.

The test labels are private: a GLUE score comes from uploading one file per test set to
gluebenchmark.com. Eleven files make a submission, named as the server expects:

  CoLA.tsv SST-2.tsv MRPC.tsv STS-B.tsv QQP.tsv MNLI-m.tsv MNLI-mm.tsv QNLI.tsv RTE.tsv
  WNLI.tsv AX.tsv

each a header `index<TAB>prediction` and one row per test example: the test file's own index
and the label as the task's files spell it (0/1 for CoLA, SST-2, MRPC, QQP, WNLI;
entailment/neutral/contradiction for MNLI and AX; entailment/not_entailment for QNLI and RTE;
STS-B's score clipped to [0, 5]). MNLI's model predicts three sets: MNLI-m (test_matched.tsv),
MNLI-mm (test_mismatched.tsv) and the diagnostic set AX (diagnostic/diagnostic.tsv).

finetune/glue_runs.py writes these files into each (task, seed) run folder as
`<run>/test_predictions/<NAME>.tsv` when the task's test file is in the data folder;
finetune/submit.py picks one run per task and assembles the submission.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence, Union

import numpy as np

from script_jax import fs
from script_jax.finetune import glue_data

PREDICTIONS_FOLDER = "test_predictions"


@dataclasses.dataclass(frozen=True)
class UnlabelledSet:
  """One unlabelled test file of the standard GLUE layout and its submission file."""
  name: str                  # the submission file's stem: "CoLA", "MNLI-m", "AX", ...
  task: str                  # the task (glue_data.TASKS) whose fine-tuned model predicts it
  folder: str                # sub-folder of the GLUE data dir
  file: str
  text_a_column: int
  text_b_column: int | None
  index_header: str          # the header's first field: the index the server matches rows by
  expected_rows: int         # rows (without header) of the standard release

  @property
  def submission_file(self) -> str:
    return f"{self.name}.tsv"


# The server's order. Every test file starts with its index column; the text columns are those
# of the task's labelled files without the label.
TEST_SETS: tuple[UnlabelledSet, ...] = (
    UnlabelledSet("CoLA", "cola", "CoLA", "test.tsv", 1, None, "index", 1063),
    UnlabelledSet("SST-2", "sst2", "SST-2", "test.tsv", 1, None, "index", 1821),
    UnlabelledSet("MRPC", "mrpc", "MRPC", "test.tsv", 3, 4, "index", 1725),
    UnlabelledSet("STS-B", "stsb", "STS-B", "test.tsv", 7, 8, "index", 1379),
    UnlabelledSet("QQP", "qqp", "QQP", "test.tsv", 1, 2, "id", 390965),
    UnlabelledSet("MNLI-m", "mnli", "MNLI", "test_matched.tsv", 8, 9, "index", 9796),
    UnlabelledSet("MNLI-mm", "mnli", "MNLI", "test_mismatched.tsv", 8, 9, "index", 9847),
    UnlabelledSet("QNLI", "qnli", "QNLI", "test.tsv", 1, 2, "index", 5463),
    UnlabelledSet("RTE", "rte", "RTE", "test.tsv", 1, 2, "index", 3000),
    UnlabelledSet("WNLI", "wnli", "WNLI", "test.tsv", 1, 2, "index", 146),
    UnlabelledSet("AX", "mnli", "diagnostic", "diagnostic.tsv", 1, 2, "index", 1104),
)


def sets_predicted_by(task: Union[str, glue_data.GlueTask]) -> tuple[UnlabelledSet, ...]:
  """The test sets the model fine-tuned for `task` predicts (MNLI: MNLI-m, MNLI-mm, AX)."""
  name = glue_data.get_task(task).trained_as
  return tuple(t for t in TEST_SETS if t.task == name)


def unlabelled_path(data_dir: str, unlabelled: UnlabelledSet) -> str:
  return fs.join(data_dir, unlabelled.folder, unlabelled.file)


def parse_test_tsv(text: str, unlabelled: UnlabelledSet, source: str = "<text>"
                   ) -> tuple[list[str], list[glue_data.Example]]:
  """The test file's indices and its examples (label 0, or 0.0 for STS-B: placeholders).

  Split as glue_data.parse_glue_tsv splits the labelled files (on "\\n" and "\\t" only, a BOM
  and "\\r" dropped); the header's first field is checked, so a file without one is refused
  rather than losing a row.
  """
  spec = glue_data.get_task(unlabelled.task)
  text = text.removeprefix("\ufeff")
  lines = text.split("\n")
  if lines and lines[-1] == "":
    lines.pop()
  columns = [0, unlabelled.text_a_column] + ([unlabelled.text_b_column]
                                           if unlabelled.text_b_column is not None else [])
  min_fields = max(columns) + 1
  header = lines[0].removesuffix("\r").split("\t") if lines else [""]
  if header[0] != unlabelled.index_header:
    raise glue_data.GlueDataError(
        f"{source}:1: expected a header starting with {unlabelled.index_header!r}, found "
        f"{(lines or [''])[0][:80]!r}; the {unlabelled.name} test file of the standard GLUE "
        "release starts with one.")
  placeholder = 0.0 if spec.is_regression else 0
  indices, examples = [], []
  for number, line in enumerate(lines[1:], start=2):
    fields = line.removesuffix("\r").split("\t")
    if len(fields) < min_fields:
      raise glue_data.GlueDataError(
          f"{source}:{number}: {len(fields)} tab-separated field(s), the {unlabelled.name} test "
          f"file needs at least {min_fields}: {line[:80]!r}")
    indices.append(fields[0])
    text_b = fields[unlabelled.text_b_column] if unlabelled.text_b_column is not None else None
    examples.append(glue_data.Example(guid=f"{unlabelled.name}-test-{fields[0]}",
                                      text_a=fields[unlabelled.text_a_column], text_b=text_b,
                                      label=placeholder))
  if len(set(indices)) != len(indices):
    raise glue_data.GlueDataError(f"{source}: repeated indices; the server matches rows by "
                                  "index, so each must be unique.")
  return indices, examples


def read_test_set(data_dir: str, unlabelled: UnlabelledSet, *, check_counts: bool = True
                  ) -> tuple[list[str], list[glue_data.Example]]:
  """Reads a test file from the standard layout; row count checked as read_glue_split does."""
  path = unlabelled_path(data_dir, unlabelled)
  indices, examples = parse_test_tsv(fs.read_bytes(path).decode("utf-8"), unlabelled, path)
  if check_counts and len(examples) != unlabelled.expected_rows:
    raise glue_data.GlueDataError(
        f"{path}: expected {unlabelled.expected_rows:,} test rows for {unlabelled.name} (the "
        f"standard GLUE release), found {len(examples):,}.")
  return indices, examples


def prediction_strings(unlabelled: UnlabelledSet, predictions_N: np.ndarray) -> list[str]:
  """Predictions as the server reads them: the label string, or the score clipped to [0, 5]."""
  spec = glue_data.get_task(unlabelled.task)
  if spec.is_regression:
    clipped = np.clip(np.asarray(predictions_N, np.float64), 0.0, glue_data.REGRESSION_MAX)
    return [f"{x:.3f}" for x in clipped]
  return [spec.labels[int(i)] for i in predictions_N]


def submission_text(unlabelled: UnlabelledSet, indices: Sequence[str],
                    predictions_N: np.ndarray) -> str:
  """The submission file's text: `index<TAB>prediction`, a row per test example."""
  if len(indices) != len(predictions_N):
    raise ValueError(f"{len(indices)} indices but {len(predictions_N)} predictions for "
                     f"{unlabelled.name}.")
  rows = zip(indices, prediction_strings(unlabelled, predictions_N))
  return "index\tprediction\n" + "".join(f"{i}\t{p}\n" for i, p in rows)


def predictions_path(run_dir: str, unlabelled: UnlabelledSet) -> str:
  return fs.join(run_dir, PREDICTIONS_FOLDER, unlabelled.submission_file)


def read_submission(path: str, unlabelled: UnlabelledSet) -> list[tuple[str, str]]:
  """The (index, prediction) rows of a submission file, each checked against the task's
  labels (or as a score in [0, 5]); raises GlueDataError naming the line otherwise."""
  spec = glue_data.get_task(unlabelled.task)
  lines = fs.read_bytes(path).decode("utf-8").split("\n")
  if lines[-1] == "":
    lines.pop()
  if not lines or lines[0] != "index\tprediction":
    raise glue_data.GlueDataError(f"{path}:1: expected the header 'index<TAB>prediction'.")
  rows = []
  for number, line in enumerate(lines[1:], start=2):
    fields = line.split("\t")
    ok = len(fields) == 2
    if ok and spec.is_regression:
      try:
        ok = 0.0 <= float(fields[1]) <= glue_data.REGRESSION_MAX
      except ValueError:
        ok = False
    elif ok:
      ok = fields[1] in spec.labels
    if not ok:
      raise glue_data.GlueDataError(f"{path}:{number}: not a valid {unlabelled.name} "
                                    f"prediction row: {line[:80]!r}")
    rows.append((fields[0], fields[1]))
  return rows
