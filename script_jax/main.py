"""Pretrains an encoder with SCRIPT, ELECTRA or BERT-MLM.

  python -m script_jax.main --config=configs/tiny.py --workdir=/tmp/tiny
  python -m script_jax.main --config=configs/small.py --config.objective=electra --workdir=...

Resumes from WORKDIR's latest checkpoint when there is one. On a multi-host TPU VM pod slice pass
--distributed so every host joins `jax.distributed` before anything else touches JAX (see
launch/). SIGTERM (a preempted VM) saves a checkpoint and exits cleanly.
"""

import os
import sys
import warnings

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from script_jax import cli_errors
from script_jax import config_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and prepared data.")
flags.DEFINE_bool("distributed", False,
                  "Call jax.distributed.initialize() first (multi-host). On TPU VMs and SLURM "
                  "the cluster is detected; elsewhere also pass the three flags below.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (with --distributed).")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --distributed).")
flags.DEFINE_integer("process_id", None, "This process's index (with --distributed).")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries:
  """Drops the INFO chatter of orbax and friends from the console; warnings and errors still
  show, as one line without the traceback (a failed save is then reported by the trainer)."""
  NOISY = ("/orbax/", "/jax/_src/", "replica_slices", "/tensorstore/", "/asyncio/")

  def filter(self, record):
    if not any(n in record.pathname for n in self.NOISY):
      return True
    record.exc_info, record.exc_text = None, None
    return record.levelno >= 30


def _without_closed_loop_noise(unraisablehook):
  """sys.unraisablehook less the "Event loop is closed" tracebacks that tensorstore's write
  callbacks print once orbax has given up on a failed save (the trainer reports the failure)."""
  def hook(unraisable):
    if (unraisable.exc_type is RuntimeError and
        str(unraisable.exc_value) == "Event loop is closed"):
      return
    unraisablehook(unraisable)
  return hook


def main(argv):
  logging.get_absl_handler().addFilter(_QuietLibraries())
  sys.unraisablehook = _without_closed_loop_noise(sys.unraisablehook)
  # The same failed save leaves orbax's write coroutines unawaited.
  warnings.filterwarnings("ignore", message="coroutine .* was never awaited",
                          category=RuntimeWarning)
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  # Before JAX starts libtpu: rbg's bits drawn per shard on TPU (a no-op elsewhere).
  libtpu_args = config_lib.libtpu_init_args(FLAGS.config, os.environ.get("LIBTPU_INIT_ARGS", ""))
  if libtpu_args != os.environ.get("LIBTPU_INIT_ARGS", ""):
    os.environ["LIBTPU_INIT_ARGS"] = libtpu_args
    logging.info("LIBTPU_INIT_ARGS=%s", libtpu_args)
  import jax  # pylint: disable=g-import-not-at-top  (jax config: after LIBTPU_INIT_ARGS)
  if FLAGS.distributed:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  with cli_errors.friendly_errors():  # before the heavier imports: a mistake is said at once
    config_lib.validate_config(FLAGS.config)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (heavy: after the config check)
  tf.config.set_visible_devices([], "GPU")  # tf.data only: leave the accelerators to JAX
  from script_jax import train  # pylint: disable=g-import-not-at-top  (heavy: after the config check)
  logging.info("JAX process %d/%d, %d devices: %s", jax.process_index(), jax.process_count(),
               jax.device_count(), jax.devices()[0].device_kind)
  with cli_errors.friendly_errors():
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main, flags_parser=cli_errors.parse_flags)
