"""Time to the first batch when a run resumes late in an epoch, for each `data.order`.

  python -m script_jax.bench.resume_data --config=configs/mini.py --data_dir=OUT/data \
      [--fractions=0.1,0.5,0.9] [--orders=buffer,windows] [--output=resume_data.json]

--data_dir is a folder made by script_jax.data.prepare for the config. For each order
("buffer": files interleaved through a shuffle buffer, resume reads its way back to its place;
"windows": files read whole in a per-epoch order and shuffled within windows, resume seeks) and
each fraction f of the first epoch, the pipeline is built with start_step = f x (this host's
sequences per epoch) / (per-host batch) and timed from `create_pretraining_dataset` to the first
NumPy batch, the trainer's wait before its first step. Both orders run side by side in one
process, one after the other at each position, so they share the machine's state.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import time

from absl import app
from absl import flags
from ml_collections import config_flags

from script_jax import cli_errors
from script_jax import config_lib
from script_jax import fs
from script_jax.data import prepared_folder

FLAGS = flags.FLAGS


def define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "Pretraining config (configs/*.py).",
                                  lock_config=True)
  flags.DEFINE_string("data_dir", None, "A prepared folder (script_jax.data.prepare).")
  flags.DEFINE_list("fractions", ["0.1", "0.5", "0.9"], "Where in the first epoch to resume.")
  flags.DEFINE_list("orders", list(config_lib.DATA_ORDERS), "The data.order values to time.")
  flags.DEFINE_string("output", "", "Also write the figures here as JSON.")
  flags.mark_flags_as_required(["config", "data_dir"])


def time_to_first_batch(config, metadata: dict, data_dir: str, start_step: int) -> float:
  """Seconds from building the pipeline at `start_step` to its first batch as NumPy arrays."""
  from script_jax.data import pipeline  # pylint: disable=g-import-not-at-top  (heavy: tensorflow)
  start = time.perf_counter()
  ds = pipeline.create_pretraining_dataset(config, metadata, data_dir, start_step=start_step)
  next(ds.as_numpy_iterator())
  return time.perf_counter() - start


def benchmark(config, data_dir: str, fractions: list[float],
              orders: tuple[str, ...] = config_lib.DATA_ORDERS) -> dict:
  """The figures: for each fraction, the resume step and each order's seconds."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (heavy: tensorflow)
  metadata = prepared_folder.load_metadata(data_dir)
  examples = sum(s["num_examples"] for s in metadata["shards"])
  rows = []
  for fraction in fractions:
    start_step = int(fraction * examples) // config.batch_size
    row = {"fraction": fraction, "start_step": start_step}
    for order in orders:
      run_config = config.copy_and_resolve_references()
      run_config.data.order = order
      row[f"{order}_seconds"] = round(time_to_first_batch(run_config, metadata, data_dir,
                                                          start_step), 3)
    rows.append(row)
  return {
      "rows": rows,
      "examples_per_epoch": examples,
      "num_shards": len(metadata["shards"]),
      "batch_size": config.batch_size,
      "seq_len": config.seq_len,
      "shuffle_buffer": config.data.shuffle_buffer,
      "data_dir": fs.abspath(data_dir),
      "cpu_count": os.cpu_count(),
      "machine": platform.processor() or platform.machine(),
      "tensorflow": tf.__version__,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


def table(figures: dict) -> str:
  orders = [o for o in config_lib.DATA_ORDERS if f"{o}_seconds" in figures["rows"][0]]
  lines = ["| resume at | step | " + " | ".join(f"{o} (s)" for o in orders) + " |",
           "|---:|---:|" + "---:|" * len(orders)]
  for row in figures["rows"]:
    lines.append(f"| {row['fraction']:.0%} of an epoch | {row['start_step']:,} | " +
                 " | ".join(f"{row[o + '_seconds']:.2f}" for o in orders) + " |")
  return "\n".join(lines)


def main(argv):
  def body():
    try:
      fractions = [float(f) for f in FLAGS.fractions]
    except ValueError:
      raise config_lib.ConfigError(f"--fractions takes numbers: {FLAGS.fractions}") from None
    if not all(0 <= f < 1 for f in fractions):
      raise config_lib.ConfigError(f"--fractions must lie in [0, 1): {fractions}")
    unknown = [o for o in FLAGS.orders if o not in config_lib.DATA_ORDERS]
    if unknown or not FLAGS.orders:
      raise config_lib.ConfigError(f"--orders takes {', '.join(config_lib.DATA_ORDERS)}: "
                                   f"{','.join(FLAGS.orders)}")
    import tensorflow as tf  # pylint: disable=g-import-not-at-top  (heavy: tensorflow)
    tf.config.set_visible_devices([], "GPU")
    figures = benchmark(FLAGS.config, FLAGS.data_dir, fractions, tuple(FLAGS.orders))
    print(f"{figures['examples_per_epoch']:,} sequences per epoch in {figures['num_shards']} "
          f"shards, batch {figures['batch_size']}, shuffle_buffer {figures['shuffle_buffer']:,}")
    print(table(figures))
    if FLAGS.output:
      with fs.open(FLAGS.output, "w") as f:
        json.dump(figures, f, indent=2)
  cli_errors.run_cli(argv, body)


if __name__ == "__main__":
  define_flags()
  app.run(main)
