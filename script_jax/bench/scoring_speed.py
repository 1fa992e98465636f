"""Sentences per second of the critic's one-pass PLL (eq. 7) vs the masked-LM PLL.

  python -m script_jax.bench.scoring_speed --config=configs/small.py
  python -m script_jax.bench.scoring_speed --workdir=/tmp/tiny_script --output=bench.json

Both methods score the same random sentences (about --num_tokens tokens each, no [CLS]/[SEP])
with the same model, batch size and length buckets. Without --workdir the model is
random-initialised from --config: the speed does not depend on the weights. Compilation is done
on a warm-up pass and not timed. A benchmark, not a test: it prints figures.
"""

from __future__ import annotations

import json
import os
import platform
import time
from typing import Optional

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from script_jax import checkpoints
from script_jax import cli_errors
from script_jax import fs
from script_jax import models
from script_jax.data import prepared_folder
from script_jax.scoring import pll_scorer

FLAGS = flags.FLAGS


def define_flags():
  """The command-line flags (defined only when run as a program: modules importing this one
  may define the same names)."""
  config_flags.DEFINE_config_file("config", None, "A config (configs/*.py) for a random model.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "A pretraining workdir; its checkpoint instead of --config.")
  flags.DEFINE_integer("num_sentences", 256, "Sentences scored by each method.")
  flags.DEFINE_integer("num_tokens", 20, "Mean tokens per sentence (uniform in +-4).")
  flags.DEFINE_integer("batch_size", 64, "Sequences per forward pass (masked copies for mlm).")
  flags.DEFINE_integer("repeats", 1, "Timed passes per method (the best is reported).")
  flags.DEFINE_integer("seed", 0, "Seed of the sentences and the random weights.")
  flags.DEFINE_string("output", None, "Write the figures as JSON here.")


def random_model(config, seed: int = 0):
  """(model, params) random-initialised from a config."""
  model = models.build_model(config)
  ids = np.zeros((1, 8), np.int32)
  variables = jax.jit(model.init)(jax.random.key(seed), ids, ids, np.ones_like(ids),
                                  np.zeros((1, 1), np.int32))
  return model, variables["params"]


def random_sentences(vocab_size: int, num_sentences: int, num_tokens: int, seed: int = 0,
                     first_id: int = 5):
  """Token-id lists of num_tokens +- 4 ids drawn from [first_id, vocab_size)."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(max(1, num_tokens - 4), num_tokens + 5, size=num_sentences)
  return [rng.integers(first_id, vocab_size, size=n).tolist() for n in lengths]


def time_method(scorer, sentences, repeats: int = 1) -> dict:
  """Scores once to compile, then times `repeats` passes; the best pass's figures."""
  scorer.score_ids(sentences[:scorer.batch_size])  # compiles the one bucket's shape
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    _, num_tokens = scorer.score_ids(sentences)
    best = min(best, time.perf_counter() - start)
  return {"seconds": best, "sentences_per_sec": len(sentences) / best,
          "tokens_per_sec": float(num_tokens.sum()) / best}


def cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def benchmark(model, params, special_ids: dict, max_len: int, vocab_size: int,
              num_sentences: int, num_tokens: int, batch_size: int, repeats: int = 1,
              seed: int = 0, logsumexp_chunk: Optional[int] = None) -> dict:
  """Both methods on the same sentences: {'critic': {...}, 'mlm': {...}, 'speedup': x}."""
  first_id = max(special_ids.values()) + 1
  sentences = random_sentences(vocab_size, num_sentences, num_tokens, seed, first_id)
  result = {}
  for method in pll_scorer.METHODS:
    scorer = pll_scorer.Scorer(model, params, special_ids=special_ids, max_len=max_len,
                            method=method, batch_size=batch_size, long="truncate",
                            logsumexp_chunk=(pll_scorer.DEFAULT_LOGSUMEXP_CHUNK
                                             if logsumexp_chunk is None else logsumexp_chunk))
    result[method] = time_method(scorer, sentences, repeats)
  result["speedup"] = result["critic"]["sentences_per_sec"] / result["mlm"]["sentences_per_sec"]
  result["setup"] = {
      "num_sentences": num_sentences, "mean_tokens": float(np.mean([len(s) for s in sentences])),
      "batch_size": batch_size, "max_len": max_len, "device": str(jax.devices()[0].device_kind),
      "platform": jax.default_backend(), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
      "date": time.strftime("%Y-%m-%d"),
  }
  return result


def format_table(result: dict) -> str:
  c, m = result["critic"], result["mlm"]
  rows = [("method", "sentences/s", "tokens/s", "seconds"),
          ("critic PLL (eq. 7)", f"{c['sentences_per_sec']:.1f}", f"{c['tokens_per_sec']:.0f}",
           f"{c['seconds']:.2f}"),
          ("MLM PLL", f"{m['sentences_per_sec']:.1f}", f"{m['tokens_per_sec']:.0f}",
           f"{m['seconds']:.2f}")]
  widths = [max(len(r[i]) for r in rows) for i in range(4)]
  lines = ["  ".join(x.ljust(w) for x, w in zip(r, widths)) for r in rows]
  lines.append(f"critic / MLM: {result['speedup']:.1f}x")
  return "\n".join(lines)


def _load_and_benchmark():
  """(config, source, result) for the model that --workdir or --config names."""
  if FLAGS.workdir:
    if not fs.isdir(FLAGS.workdir):
      raise pll_scorer.ScoringError(f"The workdir {FLAGS.workdir} does not exist.")
    config, model, params = checkpoints.load_pretrained(FLAGS.workdir)
    source = FLAGS.workdir
    try:
      _, special_ids = prepared_folder.load_workdir_tokenizer(FLAGS.workdir, config)
    except Exception as e:  # pylint: disable=broad-except
      if not cli_errors.is_user_error(e):
        raise
      special_ids = None  # ids are random anyway; only [CLS]/[SEP]/[MASK] matter
  elif FLAGS.config is not None:
    config = FLAGS.config
    model, params = random_model(config, FLAGS.seed)
    source = "random init from --config"
    special_ids = None
  else:
    raise pll_scorer.ScoringError("Give --workdir=DIR or --config=configs/small.py.")
  special_ids = special_ids or {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
  max_len = min(int(config.seq_len), int(config.model.max_position_embeddings))
  result = benchmark(model, params, special_ids, max_len, int(config.model.vocab_size),
                     FLAGS.num_sentences, FLAGS.num_tokens, FLAGS.batch_size, FLAGS.repeats,
                     FLAGS.seed)
  return config, source, result


def main(argv):
  config, source, result = cli_errors.run_cli(argv, _load_and_benchmark)
  result["setup"].update(source=source, objective=config.objective,
                         model={k: config.model[k] for k in (
                             "vocab_size", "hidden_size", "embedding_size", "num_layers",
                             "num_heads", "intermediate_size", "dtype")})
  setup = result["setup"]
  print(f"{config.objective} model ({source}), {setup['num_sentences']} sentences of "
        f"{setup['mean_tokens']:.1f} tokens, batch {FLAGS.batch_size}, "
        f"{setup['cpu_count']} x {setup['cpu']} ({setup['platform']}), {setup['date']}")
  print(format_table(result))
  if FLAGS.output:
    with fs.open(FLAGS.output, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  define_flags()
  app.run(main)
