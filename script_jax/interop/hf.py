"""Export a pretraining or GLUE fine-tuning run as a HuggingFace transformers model folder.

  python -m script_jax.interop.hf --workdir=WORKDIR --output_dir=HF_DIR
  python -m script_jax.interop.hf --workdir=WORKDIR --output_dir=HF_DIR --part=generator
  python -m script_jax.interop.hf --finetuned=OUT/rte/seed_0 --output_dir=HF_DIR

The folder has config.json, model.safetensors and the tokenizer files, and loads in one line:

  SCRIPT, MLM           ElectraForMaskedLM     (--layout=bert: BertForMaskedLM, needs E = H)
  ELECTRA --part=discriminator (default)       ElectraForPreTraining
          --part=generator                     ElectraForMaskedLM (its own copy of the shared
                                               embeddings, and the E -> H projection)
          --part=both                          HF_DIR/discriminator and HF_DIR/generator
  GLUE (--finetuned)    ElectraForSequenceClassification, our head folded into HuggingFace's
                        (hf_params.classifier_to_hf says how; same logits in float32)

  AutoModelForMaskedLM.from_pretrained(HF_DIR), AutoTokenizer.from_pretrained(HF_DIR)

The vocabulary padding is stripped; HuggingFace's discriminator logit is "replaced", ours
"original" (the sign is flipped on the way). Nothing needs torch here: the weights are written
with NumPy (`pip install -e '.[hf]'` brings safetensors). Paths may be local or gs://.

Importing (HuggingFace folder -> our parameters, for fine-tuning and continued pretraining) is
in hf_import; hf_export re-exports its entry points. docs/export.md has the whole story.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags

from script_jax import cli_errors
from script_jax.interop import hf_export

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags (defined only when run as a program)."""
  flags.DEFINE_string("workdir", None, "Pretraining workdir to export (or, with --finetuned, "
                      "the one it was fine-tuned from; default: its results.json's init_from).")
  flags.DEFINE_string("output_dir", None, "The HuggingFace folder to write (local or gs://).")
  flags.DEFINE_enum("part", None, hf_export.PARTS, "ELECTRA workdirs: which network "
                    "(default: discriminator); 'both' writes OUTPUT_DIR/discriminator and "
                    "/generator.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_enum("layout", "electra", hf_export.LAYOUTS, "MLM models as ElectraForMaskedLM "
                    "or BertForMaskedLM (BERT needs embedding_size == hidden_size).")
  flags.DEFINE_string("finetuned", None, "A GLUE run folder OUT/<task>/seed_<s> written with "
                      "--config.save_model=True.")
  flags.DEFINE_string("task", None, "The GLUE task of --finetuned (default: the folder's "
                      "parent's name).")
  flags.DEFINE_bool("overwrite", False, "Replace a HuggingFace model already in --output_dir.")


def main(argv) -> None:
  def body():
    import tensorflow as tf  # pylint: disable=g-import-not-at-top  (heavy: tensorflow)
    tf.config.set_visible_devices([], "GPU")  # TensorFlow only reads files here
    if not FLAGS.output_dir:
      raise hf_export.ExportError("--output_dir is required.")
    if FLAGS.finetuned:
      if FLAGS.part or FLAGS.layout != "electra" or FLAGS.step is not None:
        raise hf_export.ExportError("--part, --layout and --step do not apply to --finetuned: "
                                    "a GLUE model is written as "
                                    "ElectraForSequenceClassification.")
      written = [hf_export.export_finetuned(FLAGS.finetuned, FLAGS.output_dir,
                                            workdir=FLAGS.workdir, task=FLAGS.task,
                                            overwrite=FLAGS.overwrite)]
    elif FLAGS.workdir:
      written = hf_export.export_pretrained(FLAGS.workdir, FLAGS.output_dir, part=FLAGS.part,
                                            step=FLAGS.step, layout=FLAGS.layout,
                                            overwrite=FLAGS.overwrite)
    else:
      raise hf_export.ExportError("Give --workdir (a pretraining run) or --finetuned (a GLUE "
                                  "run).")
    for folder in written:
      print(f"wrote {folder}", file=sys.stderr)
  cli_errors.run_cli(argv, body)


if __name__ == "__main__":
  define_flags()
  app.run(main)
