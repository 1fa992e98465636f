"""A run's metrics records, merged, as JSON lines (metrics_records.py reads them).

  python -m script_jax.metrics_log --workdir=DIR        # every record, merged, as JSON lines

DIR is a pretraining workdir or a fine-tuning run folder (OUT/<task>/seed_<s>, OUT/seed_<s>).
"""

from __future__ import annotations

import json
import sys

from absl import app
from absl import flags

from script_jax import cli_errors
from script_jax import fs
from script_jax import metrics_records


def define_flags() -> None:
  """The command-line flags (defined only when run as a program)."""
  flags.DEFINE_string("workdir", None, "A pretraining workdir or a fine-tuning run "
                      "folder, OUT/<task>/seed_<s> (local or gs://).")
  flags.mark_flag_as_required("workdir")


def main(argv) -> None:

  def body():
    workdir = flags.FLAGS.workdir
    if not fs.exists(workdir):
      raise cli_errors.UserError(f"No workdir at {workdir}.")
    for record in metrics_records.read_records(workdir):
      sys.stdout.write(json.dumps(record) + "\n")
  cli_errors.run_cli(argv, body)


if __name__ == "__main__":
  define_flags()
  app.run(main)
