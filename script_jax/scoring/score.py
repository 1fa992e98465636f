"""Scores sentences with a pretrained checkpoint: one output line per input line, in order.

  python -m script_jax.scoring.score --workdir=/tmp/tiny_script --input=sentences.txt
  cat sentences.txt | python -m script_jax.scoring.score --workdir=DIR --input=- --method=mlm

Each output line is `<pll>\\t<num_tokens>\\t<sentence>`: the pseudo-log-likelihood in nats (the
critic's one-pass PLL of eq. 7, or the masked-LM PLL of Salazar et al. 2019 with --method=mlm),
the number of tokens summed (not [CLS]/[SEP]) and the input line. An empty line scores 0.0 with
0 tokens, so output line k is always input line k. See docs/scoring.md.
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO, Iterator, Optional

from absl import app
from absl import flags

from script_jax import cli_errors
from script_jax import fs
from script_jax.scoring import pll_scorer
from script_jax.scoring.pll_scorer import ScoringError

FLAGS = flags.FLAGS


def define_flags():
  """The command-line flags (defined only when run as a program: modules importing this one
  may define the same names)."""
  flags.DEFINE_string("workdir", None, "Pretraining workdir (run_config.json + checkpoints/).")
  flags.DEFINE_string("input", None, "Text file, one sentence per line; '-' for stdin.")
  flags.DEFINE_string("output", "-", "Where to write the scores; '-' for stdout.")
  flags.DEFINE_enum("method", "critic", ["critic", "mlm"],
                    "critic: one pass, sum_t log sigmoid(logsumexp s_t) (eq. 7); mlm: one masked "
                    "copy per token, sum_t log p(x_t | rest).")
  flags.DEFINE_integer("batch_size", 64, "Sequences per forward pass (masked copies for mlm).")
  flags.DEFINE_enum("long", "error", ["error", "truncate", "window"],
                    "Sentences longer than the model's length: error (default), truncate, or "
                    "score in sliding windows.")
  flags.DEFINE_enum("errors", "strict", ["strict", "replace"],
                    "Input bytes that are not UTF-8: strict = error naming the line; replace = "
                    "score them as U+FFFD.")
  flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the latest).")
  flags.DEFINE_float("progress_every_secs", 10.0, "Report progress on stderr this often.")


# Lines read, scored and written at a time: enough that the padded last batch of each length
# bucket is a small share, few enough that memory stays flat.
CHUNK_LINES = 4096


def _decode(raw: bytes, line_number: int, source: str, errors: str) -> str:
  raw = raw[:-1] if raw.endswith(b"\n") else raw
  raw = raw[:-1] if raw.endswith(b"\r") else raw
  try:
    return raw.decode("utf-8", errors=errors)
  except UnicodeDecodeError as e:
    raise ScoringError(
        f"{source}: line {line_number} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
        f"{e.start + 1}). Fix the file, or pass --errors=replace to score it with U+FFFD."
    ) from None


def read_lines(stream: IO[bytes], source: str, errors: str = "strict") -> Iterator[str]:
  """The lines of a binary stream as text, newline removed; bad UTF-8 names its line."""
  for number, raw in enumerate(stream, start=1):
    yield _decode(raw, number, source, errors)


def check_input_file(path: str, errors: str = "strict") -> int:
  """Validates a whole file's UTF-8 up front (so a bad file writes nothing); returns its lines."""
  count = 0
  with fs.open(path, "rb") as f:
    for count, _ in enumerate(read_lines(f, path, errors), start=1):
      pass
  return count


def format_score(pll: float, num_tokens: int, sentence: str) -> str:
  """One output line: `<pll>\\t<num_tokens>\\t<sentence>`."""
  return f"{pll:.6f}\t{num_tokens}\t{sentence}\n"


class Progress:
  """Sentences scored and sentences/s on stderr, at most every `every_secs` seconds."""

  def __init__(self, total: Optional[int], every_secs: float, stream: IO[str] = sys.stderr):
    self.total, self.every, self.stream = total, every_secs, stream
    self.done, self.start = 0, time.time()
    self.last = self.start

  def __call__(self, n: int) -> None:
    self.done += n
    now = time.time()
    if now - self.last >= self.every:
      self.last = now
      self.stream.write(self.line(now) + "\n")
      self.stream.flush()

  def line(self, now: Optional[float] = None) -> str:
    elapsed = max((now or time.time()) - self.start, 1e-9)
    of = f"/{self.total:,}" if self.total is not None else ""
    return (f"scored {self.done:,}{of} sentences in {elapsed:.1f} s, "
            f"{self.done / elapsed:.1f} sentences/s")


def score_lines(scorer, lines: Iterator[str], out: IO[str], progress=None,
                chunk_lines: int = CHUNK_LINES, first_line: int = 1) -> int:
  """Scores `lines` chunk by chunk and writes one formatted line per input line; returns count."""
  written = 0
  chunk: list[str] = []

  def flush():
    nonlocal written
    base = first_line + written
    pll, num_tokens = scorer.score(chunk, describe=lambda i: f"line {base + i}",
                                   progress=progress)
    out.writelines(format_score(p, int(n), s) for p, n, s in zip(pll, num_tokens, chunk))
    written += len(chunk)
    chunk.clear()

  for line in lines:
    chunk.append(line)
    if len(chunk) >= chunk_lines:
      flush()
  if chunk:
    flush()
  return written


def run(workdir: str, input_path: str, output_path: str = "-", method: str = "critic",
        batch_size: int = 64, long: str = "error", errors: str = "strict",
        step: Optional[int] = None, progress_every_secs: float = 10.0) -> int:
  """The CLI's work: load the checkpoint, score the input, write the output; returns lines."""
  total = None
  if input_path != "-":
    if not fs.isfile(input_path):
      raise pll_scorer.ScoringError(f"The input file {input_path} does not exist.")
    total = check_input_file(input_path, errors)
  if output_path != "-" and not fs.isdir(fs.dirname(fs.abspath(output_path))):
    raise pll_scorer.ScoringError(f"The folder of --output={output_path} does not exist.")
  if not fs.isdir(workdir):
    raise pll_scorer.ScoringError(f"The workdir {workdir} does not exist.")
  scorer = pll_scorer.Scorer.from_workdir(workdir, step=step, method=method, batch_size=batch_size,
                                       long=long)
  progress = Progress(total, progress_every_secs)
  in_stream = sys.stdin.buffer if input_path == "-" else fs.open(input_path, "rb")
  source = "<stdin>" if input_path == "-" else input_path
  try:
    lines = read_lines(in_stream, source, errors)
    if output_path == "-":
      if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(encoding="utf-8")
      count = score_lines(scorer, lines, sys.stdout, progress)
      sys.stdout.flush()
    else:
      # Written to a temporary file and renamed: a failed run leaves no half-written output.
      folder = fs.dirname(fs.abspath(output_path))
      tmp = fs.join(folder, f".score-{os.getpid()}.tmp")
      try:
        with fs.open(tmp, "w") as out:
          count = score_lines(scorer, lines, out, progress)
        fs.replace(tmp, output_path)
      except BaseException:
        if fs.exists(tmp):
          fs.remove(tmp)
        raise
  finally:
    if in_stream is not sys.stdin.buffer:
      in_stream.close()
  print(f"{progress.line()} ({method}, {count:,} lines)", file=sys.stderr)
  return count


def main(argv):
  cli_errors.run_cli(argv, lambda: run(FLAGS.workdir, FLAGS.input, FLAGS.output, FLAGS.method,
                                    FLAGS.batch_size, FLAGS.long, FLAGS.errors, FLAGS.step,
                                    FLAGS.progress_every_secs))


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["workdir", "input"])
  app.run(main)
