"""Raw text to packed, tokenized TFRecord shards plus metadata.json (the command; the library,
and what the folder holds: data/preparation.py).

  python -m script_jax.data.prepare --config=configs/tiny.py --output_dir=/tmp/tiny_data
  python -m script_jax.data.prepare --config=configs/small.py --output_dir=/tmp/wiki \
      --source=/path/to/wiki.txt.gz --config.data.vocab_file=/path/to/bert/vocab.txt
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from script_jax import cli_errors
from script_jax.data import prepared_folder
from script_jax.data import preparation

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags (defined only when run as a program)."""
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/tiny.py.",
                                  lock_config=True)
  flags.DEFINE_string("output_dir", None, "Folder for the shards and metadata.json.")
  flags.DEFINE_string("source", None, "Overrides config.data.source: text files or folders "
                      "(comma-separated), tfds:NAME[:SPLIT], or '' for the embedded default.")
  flags.DEFINE_integer("num_workers", None, "Tokenizer processes (0/1: in-process; default: "
                       "one per core, in-process for small sources).")
  flags.DEFINE_string("tfds_data_dir", None, "TFDS data_dir for tfds: sources.")
  flags.DEFINE_string("tfds_manual_dir", None, "Folder of manual downloads (openwebtext.tar.xz).")
  flags.mark_flags_as_required(["config", "output_dir"])


def main(argv):
  def body():
    metadata = preparation.prepare(FLAGS.config, FLAGS.output_dir, FLAGS.source,
                                   num_workers=FLAGS.num_workers,
                                   tfds_data_dir=FLAGS.tfds_data_dir,
                                   tfds_manual_dir=FLAGS.tfds_manual_dir)
    print(prepared_folder.summary(metadata))
  cli_errors.run_cli(argv, body, quiet=False)  # its progress lines stay


if __name__ == "__main__":
  define_flags()
  app.run(main)
