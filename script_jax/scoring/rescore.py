"""Rescores ASR n-best lists with a PLL and reports WERs shaped like the paper's Table 3.

  python -m script_jax.scoring.rescore --workdir=DIR --dev=dev-clean.am.json \\
      --test=test-clean.am.json --test=test-other.am.json.gz [--method=critic|mlm] \\
      [--length_penalty=none|tokens|gnmt] [--output_json=rescore.json]

N-best files use the layout of awslabs/mlm-scoring (optionally gzipped):
  {utterance_id: {"hyp_1": {"score": <acoustic log score>, "text": ...}, ..., "ref": <text>}}

Every hypothesis h gets (Section 3.2; Salazar et al., 2019; Shin et al., 2019)
  score(h) = am(h) + lambda * PLL(h) / LP(h),
  LP(h) = 1 (none), |h| (tokens), or ((5 + |h|) / 6)^alpha (gnmt, Wu et al., 2016),
with |h| the number of tokens PLL(h) sums over. lambda is the value of the grid that minimises
the dev set's WER (ties: the smallest), then applied unchanged to every test set. WER is corpus
level: total word edits (jiwer) / total reference words.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
import re
import sys
from typing import Optional, Sequence

from absl import app
from absl import flags
import jiwer
import numpy as np

from script_jax import cli_errors
from script_jax import fs
from script_jax.scoring import pll_scorer
from script_jax.scoring.pll_scorer import ScoringError
from script_jax.scoring.score import Progress

FLAGS = flags.FLAGS


def define_flags():
  """The command-line flags (defined only when run as a program: modules importing this one
  may define the same names)."""
  flags.DEFINE_string("workdir", None, "Pretraining workdir (run_config.json + checkpoints/).")
  flags.DEFINE_string("dev", None, "N-best file (.json or .json.gz) on which lambda is chosen.")
  flags.DEFINE_multi_string("test", [], "N-best file(s) the chosen lambda is applied to.")
  flags.DEFINE_enum("method", "critic", ["critic", "mlm"], "PLL: critic (eq. 7) or mlm.")
  flags.DEFINE_enum("length_penalty", "none", ["none", "tokens", "gnmt"],
                    "Divide the PLL by 1, by |h| tokens, or by ((5+|h|)/6)^length_alpha.")
  flags.DEFINE_float("length_alpha", 0.6, "alpha of the gnmt length penalty.")
  flags.DEFINE_string("lambdas", "0:2:0.05", "The grid of lambda: START:STOP:STEP or a,b,c.")
  flags.DEFINE_integer("batch_size", 64, "Sequences per forward pass (masked copies for mlm).")
  flags.DEFINE_enum("long", "error", ["error", "truncate", "window"],
                    "Hypotheses longer than the model's length: see script_jax/scoring/pll_scorer.py.")
  flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the latest).")
  flags.DEFINE_string("output_json", None, "Write the WERs, lambda and the dev grid here.")


_HYP_KEY = re.compile(r"^hyp_(\d+)$")


def _error(message: str) -> Exception:
  return ScoringError(message)


# ----------------------------------------------------------------------------- n-best files

@dataclasses.dataclass
class Utterance:
  """One utterance of an n-best list: reference and hypotheses in hyp_1, hyp_2, ... order."""
  id: str
  ref: str
  texts: list[str]
  am_scores: np.ndarray  # [H] float64


def set_name(path: str) -> str:
  """A column name for an n-best file: dev-clean.am.json.gz -> dev-clean."""
  name = os.path.basename(path)
  for suffix in (".gz", ".json", ".am"):
    if name.endswith(suffix):
      name = name[:-len(suffix)]
  return name or path


def load_nbest(path: str) -> list[Utterance]:
  """Reads and validates an n-best file (.json, or gzip-compressed whatever its name)."""
  if not fs.isfile(path):
    raise _error(f"The n-best file {path} does not exist.")
  with fs.open(path, "rb") as f:
    data = f.read()
  if data[:2] == b"\x1f\x8b":
    try:
      data = gzip.decompress(data)
    except (OSError, EOFError) as e:
      raise _error(f"{path} looks gzip-compressed but cannot be decompressed: {e}") from None
  try:
    obj = json.loads(data.decode("utf-8"))
  except UnicodeDecodeError as e:
    raise _error(f"{path} is not UTF-8 JSON ({e.reason} at byte {e.start}).") from None
  except json.JSONDecodeError as e:
    raise _error(f"{path} is not a JSON n-best file: {e.msg} at line {e.lineno} column "
                 f"{e.colno}.") from None
  if not isinstance(obj, dict):
    raise _error(f"{path}: expected a JSON object {{utterance_id: {{\"hyp_1\": {{\"score\": ..., "
                 f"\"text\": ...}}, ..., \"ref\": ...}}}}, got a {type(obj).__name__}.")
  if not obj:
    raise _error(f"{path} holds no utterances.")
  return [_utterance(path, utt_id, entry) for utt_id, entry in obj.items()]


def _utterance(path: str, utt_id: str, entry) -> Utterance:
  where = f"{path}: utterance {utt_id!r}"
  if not isinstance(entry, dict):
    raise _error(f"{where} is a {type(entry).__name__}, not an object with hyp_N and ref.")
  if "ref" not in entry:
    raise _error(f"{where} has no 'ref' (reference text).")
  if not isinstance(entry["ref"], str):
    raise _error(f"{where}: 'ref' must be a string, got {type(entry['ref']).__name__}.")
  hyps = []
  for key, hyp in entry.items():
    if not key.startswith("hyp_"):
      continue  # "ref" and any extra fields
    m = _HYP_KEY.match(key)
    if not m:
      raise _error(f"{where}: hypothesis key {key!r} is not hyp_<number>.")
    if not isinstance(hyp, dict) or "score" not in hyp or "text" not in hyp:
      raise _error(f"{where}, {key}: expected {{\"score\": <number>, \"text\": <string>}}, "
                   f"got {json.dumps(hyp)[:100]}.")
    score, text = hyp["score"], hyp["text"]
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
      raise _error(f"{where}, {key}: 'score' must be a finite number, got {score!r}.")
    if not isinstance(text, str):
      raise _error(f"{where}, {key}: 'text' must be a string, got {type(text).__name__}.")
    hyps.append((int(m.group(1)), text.strip(), float(score)))
  if not hyps:
    raise _error(f"{where} has no hypotheses (no hyp_1, hyp_2, ... entries).")
  hyps.sort()
  return Utterance(str(utt_id), entry["ref"].strip(), [h[1] for h in hyps],
                   np.asarray([h[2] for h in hyps], np.float64))


# ----------------------------------------------------------------------------- WER

def word_edits(refs: Sequence[str], hyps: Sequence[str]) -> np.ndarray:
  """Word-level Levenshtein distance (S + D + I) of each (ref, hyp) pair, by jiwer: [N] int."""
  if not refs:
    return np.zeros(0, np.int64)
  # Words are split on any whitespace (jiwer alone splits on spaces and keeps tabs in words).
  normal = lambda texts: [" ".join(t.split()) for t in texts]
  out = jiwer.process_words(normal(refs), normal(hyps))
  edits = np.zeros(len(refs), np.int64)
  for i, chunks in enumerate(out.alignments):
    for c in chunks:
      if c.type in ("substitute", "delete"):
        edits[i] += c.ref_end_idx - c.ref_start_idx
      elif c.type == "insert":
        edits[i] += c.hyp_end_idx - c.hyp_start_idx
  return edits


def num_words(text: str) -> int:
  return len(text.split())


def corpus_wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
  """Total word edits / total reference words (not the mean of per-sentence WERs)."""
  total = sum(num_words(r) for r in refs)
  if total == 0:
    raise _error("WER is undefined: the references hold no words.")
  return float(word_edits(refs, hyps).sum()) / total


# ----------------------------------------------------------------------------- rescoring

def length_penalty(num_tokens: np.ndarray, kind: str = "none", alpha: float = 0.6) -> np.ndarray:
  """LP(h): 1, |h| (at least 1), or ((5 + |h|) / 6)^alpha (GNMT)."""
  n = np.asarray(num_tokens, np.float64)
  if kind == "none":
    return np.ones_like(n)
  if kind == "tokens":
    return np.maximum(n, 1.0)
  if kind == "gnmt":
    return ((5.0 + n) / 6.0) ** alpha
  raise _error(f"Unknown length penalty {kind!r}; choose none, tokens or gnmt.")


@dataclasses.dataclass
class NBestSet:
  """An n-best set as padded arrays over U utterances and H = the longest list's length."""
  name: str
  am_UxH: np.ndarray  # acoustic scores, -inf where an utterance has fewer hypotheses
  lm_UxH: np.ndarray  # PLL / LP
  edits_UxH: np.ndarray  # word edits against the reference
  ref_words: int
  num_hyps: int

  def picks(self, lam: float) -> np.ndarray:
    """The hypothesis each utterance picks with am + lambda * lm (ties: the earlier one)."""
    total = self.am_UxH + lam * np.where(np.isfinite(self.am_UxH), self.lm_UxH, 0.0)
    return np.argmax(total, axis=1)

  def wer(self, lam: float) -> float:
    picked = self.edits_UxH[np.arange(len(self.edits_UxH)), self.picks(lam)]
    return float(picked.sum()) / max(self.ref_words, 1)

  def oracle_wer(self) -> float:
    return float(self.edits_UxH.min(axis=1).sum()) / max(self.ref_words, 1)


def build_set(name: str, utterances: list[Utterance], pll_by_text: dict[str, float],
              tokens_by_text: dict[str, int], kind: str = "none",
              alpha: float = 0.6) -> NBestSet:
  """Arrays for the grid search: acoustic scores, normalised PLLs and word edits."""
  u, h = len(utterances), max(len(x.texts) for x in utterances)
  am = np.full((u, h), -np.inf)
  lm = np.zeros((u, h))
  edits = np.full((u, h), np.iinfo(np.int64).max // 4, np.int64)
  refs, hyps, where = [], [], []
  for i, utt in enumerate(utterances):
    k = len(utt.texts)
    am[i, :k] = utt.am_scores
    pll = np.asarray([pll_by_text[t] for t in utt.texts])
    ntok = np.asarray([tokens_by_text[t] for t in utt.texts])
    lm[i, :k] = pll / length_penalty(ntok, kind, alpha)
    refs += [utt.ref] * k
    hyps += utt.texts
    where += [(i, j) for j in range(k)]
  rows, cols = np.asarray(where).T
  edits[rows, cols] = word_edits(refs, hyps)
  ref_words = sum(num_words(x.ref) for x in utterances)
  if ref_words == 0:
    raise _error(f"{name}: the references hold no words, so WER is undefined.")
  return NBestSet(name, am, lm, edits, ref_words, h)


def parse_grid(spec: str) -> np.ndarray:
  """'0:2:0.05' (inclusive of STOP) or '0,0.1,0.5' -> sorted lambdas."""
  try:
    if ":" in spec:
      start, stop, step = (float(x) for x in spec.split(":"))
      if step <= 0 or stop < start:
        raise ValueError
      grid = start + step * np.arange(int(math.floor((stop - start) / step + 1e-9)) + 1)
    else:
      grid = np.asarray([float(x) for x in spec.split(",") if x.strip()])
  except ValueError:
    raise _error(f"--lambdas={spec!r}: expected START:STOP:STEP (STEP > 0) or a,b,c.") from None
  if grid.size == 0:
    raise _error(f"--lambdas={spec!r} holds no value.")
  return np.unique(np.round(grid, 10))


def grid_search(dev: NBestSet, lambdas: np.ndarray) -> tuple[float, list[tuple[float, float]]]:
  """(the lambda with the lowest dev WER, smallest on ties; [(lambda, dev WER)])."""
  curve = [(float(lam), dev.wer(float(lam))) for lam in lambdas]
  best = min(curve, key=lambda x: (x[1], x[0]))
  return best[0], curve


def format_table(sets: list[NBestSet], lam: float, method: str) -> str:
  """Table 3's shape: rows baseline / oracle / rescored, one WER (%) column per set."""
  n = max(s.num_hyps for s in sets)
  rows = [("baseline (1-best)", [s.wer(0.0) for s in sets]),
          (f"oracle ({n}-best)", [s.oracle_wer() for s in sets]),
          (f"rescored ({method}, lambda={lam:g})", [s.wer(lam) for s in sets])]
  head = ["Model"] + [s.name for s in sets]
  body = [[r] + [f"{100 * w:.2f}" for w in ws] for r, ws in rows]
  widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]
  line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
  rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
  return "\n".join([line(head), rule] + [line(r) for r in body])


def run(workdir: str, dev_path: str, test_paths: Sequence[str], method: str = "critic",
        kind: str = "none", alpha: float = 0.6, lambdas: str = "0:2:0.05",
        batch_size: int = 64, long: str = "error", step: Optional[int] = None,
        output_json: Optional[str] = None, scorer=None) -> dict:
  """The CLI's work; returns the JSON report (also printed as a table)."""
  grid = parse_grid(lambdas)
  paths = [dev_path] + list(test_paths)
  loaded = [(p, load_nbest(p)) for p in paths]  # every file checked before the model loads
  names = [set_name(p) for p in paths]
  names = [n if names.count(n) == 1 else f"{n}#{i + 1}" for i, n in enumerate(names)]
  if output_json and not fs.isdir(fs.dirname(fs.abspath(output_json))):
    raise _error(f"The folder of --output_json={output_json} does not exist.")
  if scorer is None:
    if not fs.isdir(workdir):
      raise _error(f"The workdir {workdir} does not exist.")
    scorer = pll_scorer.Scorer.from_workdir(workdir, step=step, method=method,
                                         batch_size=batch_size, long=long)

  texts, owner = [], {}
  for p, utts in loaded:
    for u in utts:
      for j, t in enumerate(u.texts):
        if t not in owner:
          owner[t] = f"{p}: utterance {u.id!r}, hyp_{j + 1}"
          texts.append(t)
  progress = Progress(len(texts), every_secs=10.0)
  pll, ntok = scorer.score(texts, describe=lambda i: owner[texts[i]], progress=progress)
  print(f"{progress.line()} (distinct hypotheses, {method})", file=sys.stderr)
  pll_by_text = dict(zip(texts, pll.tolist()))
  tokens_by_text = dict(zip(texts, ntok.tolist()))

  sets = [build_set(n, utts, pll_by_text, tokens_by_text, kind, alpha)
          for n, (_, utts) in zip(names, loaded)]
  lam, curve = grid_search(sets[0], grid)
  if lam == grid[-1] and len(grid) > 1:
    print(f"warning: the best lambda {lam:g} is the largest in --lambdas={lambdas}; "
          "extend the grid.", file=sys.stderr)
  table = format_table(sets, lam, method)
  print(table)
  report = {
      "workdir": workdir, "method": method, "length_penalty": kind,
      "length_alpha": alpha if kind == "gnmt" else None, "lambda": lam,
      "dev": names[0], "dev_grid": [{"lambda": l, "wer": w} for l, w in curve],
      "sets": {s.name: {"file": p, "utterances": int(len(s.am_UxH)), "max_hyps": s.num_hyps,
                        "reference_words": s.ref_words,
                        "wer": {"baseline": s.wer(0.0), "oracle": s.oracle_wer(),
                                "rescored": s.wer(lam)}}
               for s, p in zip(sets, paths)},
      "table": table,
  }
  if output_json:
    fs.write_json_atomically(output_json, report, sort_keys=False)
  return report


def main(argv):
  cli_errors.run_cli(argv, lambda: run(
      FLAGS.workdir, FLAGS.dev, FLAGS.test, FLAGS.method, FLAGS.length_penalty,
      FLAGS.length_alpha, FLAGS.lambdas, FLAGS.batch_size, FLAGS.long, FLAGS.step,
      FLAGS.output_json))


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["workdir", "dev"])
  app.run(main)
