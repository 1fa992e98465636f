"""Our ELECTRA and MLM train steps beside HuggingFace transformers' (PyTorch, CPU), equal shapes.

  pip install torch==2.13.0 && pip install transformers   # benchmark-only, never runtime deps
  python -m script_jax.bench.hf_peer --config=configs/small.py --batch_size=8 --output=hf_peer.json

Both sides run one full training step on the same batch (configs/small.py sizes by default:
vocab 30522, E 128, H 256, 12 layers, 4 heads, FFN 1024; generator H 64, 1 head, FFN 256):

  electra  generator forward, MLM-head logits at the P masked positions, generator loss,
           Gumbel-max sampling (no gradient), discriminator forward on the sampled sequence,
           loss = L_gen + 50 * L_disc, backward, clip at global norm 1, AdamW, LR schedule.
  mlm      the same encoder (ELECTRA's factorised embeddings E -> H, the MLM head H -> E and the
           tied decoder, as script_jax's MaskedLM), logits at the P masked positions, backward,
           clip, AdamW, LR schedule.

HF side: `ElectraForMaskedLM` (generator, and the MLM model with the discriminator's sizes) and
`ElectraForPreTraining` (discriminator), the generator sharing the discriminator's embeddings and
its decoder tied to them, as in ELECTRA. The masked-position logits are computed by calling the
HF submodules (`model.electra`, gather, `generator_predictions`, `generator_lm_head`); the stock
`forward(labels=...)` computes logits at all B*T positions, which `--hf_stock` times as well.
Same number of predictions P = int(0.155 * T), same dropout, float32, torch threads = CPU count.
Torch's OpenMP threads wait passively by default (`--omp_wait_policy`): spinning threads make
torch 20-150x slower whenever other jobs share the CPUs; on a quiet machine pass
`--omp_wait_policy=` for torch's fastest figure. Ours runs first, then HF's, in one process.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from script_jax import fs
from script_jax.bench import hf_training

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags (defined only when run as a program, so importing stays free)."""
  config_flags.DEFINE_config_file("config", "configs/small.py",
                                  "Path to a config file (configs/*.py).", lock_config=True)
  flags.DEFINE_list("objectives", ["electra", "mlm"], "Objectives to compare (electra, mlm).")
  flags.DEFINE_integer("batch_size", 8, "Batch size (both sides).")
  flags.DEFINE_integer("steps", 10, "Timed train steps per window.")
  flags.DEFINE_integer("warmup", 3, "Untimed steps before timing.")
  flags.DEFINE_integer("repeats", 2, "Timed windows per side; the fastest is reported.")
  flags.DEFINE_integer("threads", None, "torch.set_num_threads (default: the CPU count).")
  flags.DEFINE_string("omp_wait_policy", "PASSIVE", "OMP_WAIT_POLICY for torch's OpenMP threads "
                      "(set before torch loads; '' leaves the environment alone). With OpenMP's "
                      "active spinning torch ran 20-150x slower while other jobs shared the CPUs; "
                      "on a quiet machine '' can be faster: time both (docs/benchmarks.md).")
  flags.DEFINE_enum("adamw", "fused", ["fused", "foreach", "for-loop"],
                    "torch.optim.AdamW implementation (fused is the fastest on CPU).")
  flags.DEFINE_bool("hf_stock", False, "Also time HF's stock forward(labels=...) path, which "
                    "computes the MLM logits at all B*T positions.")
  flags.DEFINE_bool("skip_ours", False, "Time the HF side only.")
  flags.DEFINE_string("output", None, "Write the results as JSON to this path.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.omp_wait_policy:
    os.environ["OMP_WAIT_POLICY"] = FLAGS.omp_wait_policy  # torch is not imported yet
  report = hf_training.run_peer(FLAGS.config, FLAGS.objectives, batch_size=FLAGS.batch_size,
                                steps=FLAGS.steps, warmup=FLAGS.warmup, repeats=FLAGS.repeats,
                                threads=FLAGS.threads, adamw=FLAGS.adamw,
                                hf_stock=FLAGS.hf_stock, skip_ours=FLAGS.skip_ours)
  report["command"] = " ".join(["python", "script_jax/bench/hf_peer.py", *sys.argv[1:]])
  print(hf_training.format_table(report), flush=True)
  if FLAGS.output:
    with fs.open(FLAGS.output, "w") as f:
      json.dump(report, f, indent=2, default=str)
    print(f"Wrote {FLAGS.output}", flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
