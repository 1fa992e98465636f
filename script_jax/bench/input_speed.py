"""Throughput of the input pipeline: masked sequences per second on this machine.

  python -m script_jax.bench.input_speed --config=configs/small.py --data_dir=/tmp/wiki5 \
      --config.data.vocab_file=/path/to/vocab.txt --output=/tmp/input_benchmark.json

--data_dir is a folder made by script_jax.data.prepare; without it, the data is prepared (or
reused) in --workdir/data as the trainer would. The figure counts sequences delivered as NumPy
arrays (`as_numpy_iterator`, what the trainer consumes) after a warm-up, in one process.
"""

import datetime
import json
import os
import platform
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
import tensorflow as tf

from script_jax import fs
from script_jax.data import pipeline
from script_jax.data import preparation, prepared_folder


def benchmark(config, metadata: dict, data_dir: str, num_batches: int, warmup_batches: int,
              process_count: int = 1) -> dict:
  """Times `num_batches` batches of the pipeline after `warmup_batches`; returns the figures."""
  ds = pipeline.create_pretraining_dataset(config, metadata, data_dir, process_index=0,
                                                 process_count=process_count)
  batches = ds.as_numpy_iterator()
  for _ in range(warmup_batches):
    next(batches)
  sequences = 0
  start = time.perf_counter()
  for _ in range(num_batches):
    sequences += len(next(batches)["input_ids"])
  seconds = time.perf_counter() - start
  return {
      "sequences_per_second": round(sequences / seconds, 1),
      "tokens_per_second": round(sequences * config.seq_len / seconds),
      "batches_per_second": round(num_batches / seconds, 2),
      "per_host_batch_size": config.batch_size // process_count,
      "seq_len": config.seq_len,
      "max_predictions_per_seq": config.mask.max_predictions_per_seq,
      "num_batches": num_batches,
      "seconds": round(seconds, 3),
      "data_dir": fs.abspath(data_dir),
      "data_source": metadata["source"],
      "cpu_count": os.cpu_count(),
      "machine": platform.processor() or platform.machine(),
      "tensorflow": tf.__version__,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


def main(argv):
  del argv
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  tf.config.set_visible_devices([], "GPU")  # the pipeline runs on the CPU, as in training
  config = FLAGS.config
  if FLAGS.data_dir:
    data_dir = FLAGS.data_dir
    metadata = prepared_folder.load_metadata(data_dir)
    if metadata is None:
      raise app.UsageError(f"{data_dir} has no metadata.json; run script_jax.data.prepare first.")
  else:
    metadata = preparation.prepare_pretraining_data(config, FLAGS.workdir, process_index=0,
                                                    process_count=1)
    data_dir = prepared_folder.data_dir_of(config, FLAGS.workdir)
  result = benchmark(config, metadata, data_dir, FLAGS.num_batches, FLAGS.warmup_batches,
                     FLAGS.process_count)
  logging.info("%s", result)
  print(f"{result['sequences_per_second']:,.0f} masked sequences/s of {result['seq_len']} tokens "
        f"({result['tokens_per_second']:,} tokens/s, per-host batch "
        f"{result['per_host_batch_size']}, {result['cpu_count']} CPU cores)")
  if FLAGS.output:
    with fs.open(FLAGS.output, "w") as f:
      json.dump(result, f, indent=2)
      f.write("\n")


def _define_flags() -> None:
  # Only when run as a program, so other code can import `benchmark` next to its own --config.
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/small.py.",
                                  lock_config=True)
  flags.DEFINE_string("data_dir", None, "Prepared data (default: prepare into --workdir/data).")
  flags.DEFINE_string("workdir", "/tmp/script_jax_benchmark_input", "Used without --data_dir.")
  flags.DEFINE_integer("num_batches", 2000, "Batches to time (after the warm-up).")
  flags.DEFINE_integer("warmup_batches", 100, "Batches read before timing (fills buffers).")
  flags.DEFINE_integer("process_count", 1, "Simulate one host of this many (its share of shards).")
  flags.DEFINE_string("output", None, "Also write the result as JSON to this file.")
  flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
  _define_flags()
  app.run(main)
