"""Raw text to packed, tokenized TFRecord shards plus metadata.json.

  python -m script_jax.data.prepare --config=configs/tiny.py --output_dir=/tmp/tiny_data
  python -m script_jax.data.prepare --config=configs/small.py --output_dir=/tmp/wiki \
      --source=/path/to/wiki.txt.gz --config.data.vocab_file=/path/to/bert/vocab.txt

Sequences are packed as in ELECTRA's build_pretraining_dataset.py (Clark et al., 2020): the lines
(sentences or paragraphs) of one document are accumulated up to a target length and laid out as
`[CLS] A [SEP] B [SEP]`, with segment ids 0 for `[CLS] A [SEP]` and 1 for `B [SEP]`, then [PAD].
Most sequences have two segments; 10% have one (as ELECTRA); a share config.data.short_seq_prob
gets a random shorter target length. Unlike ELECTRA, nothing is truncated away: a line that does
not fit is split and its rest starts the next sequence, so every token of the corpus is in exactly
one sequence.

Output folder:
  train-00000-of-00008.tfrecord ...  features input_ids, segment_ids: int64 [seq_len]
  train-00000-of-00008.tfrecord.json counts of a finished shard (and how it was made)
  eval-00000-of-00001.tfrecord       the held-out documents' sequences (data.eval_fraction)
  spm.model or vocab.txt             the tokenizer, copied or trained here
  metadata.json                      written last; what the trainer and the scorer read

A share data.eval_fraction of the documents (at least one; every 1/fraction-th in corpus
order, prepared_folder.is_held_out) is set aside whole: their sequences go to the evaluation shard
only, never to a training shard. Training examples go to shards round-robin, so shards differ by at most one
example. A rerun skips
finished shards whose recipe matches, writes the others to temporary names and renames them
when complete, so an interrupted run never leaves a half-written shard under a final name.
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
