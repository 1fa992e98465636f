"""Training parity: our BERT-MLM beside HuggingFace's, from the same weights, on the same batches.

  pip install torch==2.13.0 && pip install -e ".[bench]"   # benchmark-only, never runtime deps
  python -m script_jax.bench.parity --config=configs/mini.py --workdir=DIR --steps=1500 \
      [--config.data.source=PATH] [--init=same|own] [--nodropout] [--output=parity.json]

Both sides train the MLM objective with the sizes of --config. Our side is the trainer's own
sharded, jitted step (train.make_train_step) on our model (models.MaskedLM); HuggingFace's is
BertForMaskedLM (or ElectraForMaskedLM where the embedding size differs from the hidden size:
BERT has no projection between them) with torch.optim.AdamW, the same linear warmup and decay,
clipping at the same global norm and the same weight-decay exclusions (biases and LayerNorm).
The batches are our pipeline's (prepared in DIR/data, or config.data.prepared_dir; the embedded
corpus unless --config.data.source), drawn once and fed to both: the same tokens, masks and
masked positions at every step; the loss on each side is the weighted mean NLL at the masked
positions (objectives.mlm_loss).

--init=same (the default) exports our initial parameters through interop/ (the HuggingFace
export's own name table) into the HuggingFace model; --init=own starts each side from its own
random initialisation (Flax's truncated normal against HuggingFace's plain normal with a zero
[PAD] row). With --nodropout and --init=same the two losses are equal at the first step to float
precision and drift apart only by float rounding after it; with dropout each side draws its own
masks, so the curves agree in distribution only. Prints the losses side by side every
--log_every steps and their gap (ours minus HF's), and writes every step's losses as JSON to
DIR/parity.json (and --output).

Needs the `optax` optimizer recipe (torch's AdamW is the bias-corrected one), float32.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from script_jax import cli_errors
from script_jax import fs
from script_jax import models
from script_jax import sharding as sharding_lib
from script_jax import state as state_lib
from script_jax import train
from script_jax.bench import hf_training
from script_jax.data import prepared_folder
from script_jax.interop import hf_export
from script_jax.interop import hf_folder

FLAGS = flags.FLAGS


class ParityError(cli_errors.UserError):
  """A config the comparison cannot run (one `error:` line)."""


def define_flags() -> None:
  config_flags.DEFINE_config_file("config", "configs/mini.py", "Pretraining config (sizes, "
                                  "optimizer, data).", lock_config=True)
  flags.DEFINE_string("workdir", None, "Where the prepared data and parity.json go.")
  flags.DEFINE_integer("steps", 1500, "Train steps on each side.")
  flags.DEFINE_enum("init", "same", ["same", "own"], "Start HuggingFace's model from our "
                    "initial weights (same) or from its own random initialisation (own).")
  flags.DEFINE_bool("dropout", True, "Dropout as the config says; --nodropout turns it off on "
                    "both sides (for exact agreement).")
  flags.DEFINE_integer("log_every", 100, "Print the two losses every this many steps.")
  flags.DEFINE_integer("threads", None, "torch.set_num_threads (default: the CPU count).")
  flags.DEFINE_string("output", None, "Also write the JSON here.")
  flags.mark_flags_as_required(["workdir"])


def parity_config(config, dropout: bool):
  """The MLM objective with the config's sizes; an unpadded vocabulary (HuggingFace's softmax
  has exactly vocab_size rows), unrolled layers (the export's per-layer layout)."""
  if config.optim.recipe != "optax":
    raise ParityError(f"optim.recipe={config.optim.recipe!r}: the comparison runs torch's AdamW, "
                      "the bias-corrected optimizer of the 'optax' recipe; pass "
                      "--config.optim.recipe=optax.")
  if config.model.dtype != "float32":
    raise ParityError(f"model.dtype={config.model.dtype!r}: the comparison runs float32.")
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.objective = "mlm"
    config.model.vocab_pad_multiple = 1
    config.model.scan_layers = False
    config.model.remat = False
    config.eval_every_steps = 0
    if not dropout:
      config.model.dropout_rate = 0.0
      config.model.attention_dropout_rate = 0.0
  return config


def draw_batches(config, workdir: str, steps: int) -> list[dict[str, np.ndarray]]:
  """The first `steps` batches of our pipeline (what the trainer would train on)."""
  from script_jax.data import pipeline  # pylint: disable=g-import-not-at-top  (heavy: tensorflow)
  metadata, data_dir = train._prepare_data(config, workdir)  # pylint: disable=protected-access
  dataset = pipeline.create_pretraining_dataset(config, metadata, data_dir)
  batches = []
  for batch in dataset.take(steps).as_numpy_iterator():
    batches.append({k: np.asarray(batch[k]) for k in train.BATCH_KEYS})
  if len(batches) < steps:
    raise ParityError(f"The pipeline gave {len(batches)} batches, not {steps}.")
  return batches


# ----------------------------------------------------------------------------- HuggingFace

def hf_family(cfg) -> str:
  return "bert" if cfg.embedding_size == cfg.hidden_size else "electra"


def build_hf_mlm(cfg, pad_id: int, params=None):
  """BertForMaskedLM (ElectraForMaskedLM if E != H) of cfg's sizes; with `params` (ours,
  per-layer layout) its weights are ours, through interop.hf_export.mlm_tensors."""
  import torch  # pylint: disable=g-import-not-at-top  (optional: torch)
  import transformers  # pylint: disable=g-import-not-at-top  (optional: transformers)
  family = hf_family(cfg)
  config_dict = hf_folder.hf_config_dict(cfg, "", family, pad_id)
  config_class = transformers.BertConfig if family == "bert" else transformers.ElectraConfig
  model_class = (transformers.BertForMaskedLM if family == "bert"
                 else transformers.ElectraForMaskedLM)
  model = model_class(config_class(**config_dict))
  if params is not None:
    tensors = hf_export.mlm_tensors(params, cfg, family)
    state = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # The decoder is tied to the word embeddings and the output bias; position_ids is a buffer.
    left = [k for k in missing
            if not k.endswith(("decoder.weight", "decoder.bias", "position_ids"))]
    if left or unexpected:
      raise ParityError(f"HuggingFace {model_class.__name__} and the export disagree: missing "
                        f"{left}, unexpected {unexpected}.")
    model.tie_weights()
  return model


def hf_masked_logits(model, batch):
  """MLM logits [B, P, V] at the masked positions (the head only where it is needed)."""
  import torch  # pylint: disable=g-import-not-at-top  (optional: torch)
  encoder = model.bert if hasattr(model, "bert") else model.electra
  hidden = encoder(batch["input_ids"], attention_mask=batch["input_mask"],
                   token_type_ids=batch["segment_ids"]).last_hidden_state
  hidden_p = torch.gather(hidden, 1, batch["masked_positions"][..., None].expand(
      -1, -1, hidden.shape[-1]))
  if hasattr(model, "cls"):
    return model.cls(hidden_p)
  return model.generator_lm_head(model.generator_predictions(hidden_p))


def hf_losses(model, config, batches, log_every: int, log) -> list[float]:
  """HuggingFace's training: one loss per step."""
  import torch  # pylint: disable=g-import-not-at-top  (optional: torch)
  model.train()
  optimizer, scheduler = hf_training.make_hf_optimizer(model, config, "for-loop")
  losses, began = [], time.time()
  for step, np_batch in enumerate(batches, start=1):
    batch = {k: torch.from_numpy(v).long() if v.dtype.kind == "i" else torch.from_numpy(v)
             for k, v in np_batch.items()}
    loss = hf_training._mlm_loss(  # pylint: disable=protected-access
        hf_masked_logits(model, batch), batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    losses.append(float(loss.detach()))
    if step % log_every == 0 or step == len(batches):
      log(f"[hf] step {step}/{len(batches)} loss {losses[-1]:.4f} "
          f"({step / (time.time() - began):.2f} steps/s)")
  return losses


# ----------------------------------------------------------------------------- ours

def our_losses(config, state, model, state_sharding, mesh, batches, log_every: int,
               log) -> list[float]:
  """Our trainer's step on the same batches: one loss per step."""
  step_fn = train.make_train_step(config, model, state_sharding, mesh)
  losses, began = [], time.time()
  for step, batch in enumerate(batches, start=1):
    state, metrics = step_fn(state, train.to_global_batch(batch, mesh))
    losses.append(float(jax.device_get(metrics["mlm_loss"])))
    if step % log_every == 0 or step == len(batches):
      log(f"[ours] step {step}/{len(batches)} loss {losses[-1]:.4f} "
          f"({step / (time.time() - began):.2f} steps/s)")
  return losses


def run_parity(config, workdir: str, steps: int, *, init: str = "same", dropout: bool = True,
               log_every: int = 100, threads: int | None = None, log=print) -> dict[str, Any]:
  """Both trainings; returns the report (losses per step, gaps, settings)."""
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/hf_peer.py
  import torch  # pylint: disable=g-import-not-at-top  (optional: torch)
  config = parity_config(config, dropout)
  fs.makedirs(workdir)  # parity.json goes there, even when the data is prepared elsewhere
  with config.unlocked():
    config.num_train_steps = steps  # the schedule's length on both sides
  torch.set_num_threads(threads or os.cpu_count())
  torch.manual_seed(config.seed)
  batches = draw_batches(config, workdir, steps)
  mesh = sharding_lib.create_mesh(config)
  model = models.build_model(config)
  state, state_sharding = state_lib.init_state(config, model, mesh)
  cfg = models.encoder_config_from(config.model)
  _, special_ids = prepared_folder.load_workdir_tokenizer(workdir, config)
  ours_init = jax.device_get(state.params) if init == "same" else None
  hf_model = build_hf_mlm(cfg, special_ids["pad"], ours_init)
  log(f"{steps} steps of batch {config.batch_size} x {config.seq_len}, {init} initial weights, "
      f"dropout {'on' if dropout else 'off'}; HuggingFace {type(hf_model).__name__}")
  ours = our_losses(config, state, model, state_sharding, mesh, batches, log_every, log)
  hf = hf_losses(hf_model, config, batches, log_every, log)
  gaps = [a - b for a, b in zip(ours, hf)]
  return {"settings": {"steps": steps, "init": init, "dropout": dropout,
                       "batch_size": config.batch_size, "seq_len": config.seq_len,
                       "hf_class": type(hf_model).__name__,
                       "model": json.loads(config.model.to_json()),
                       "optim": json.loads(config.optim.to_json())},
          "versions": {"jax": jax.__version__, "torch": torch.__version__},
          "ours": ours, "hf": hf, "gap": gaps,
          "mean_gap": sum(gaps) / len(gaps), "max_abs_gap": max(abs(g) for g in gaps)}


def table(report: dict[str, Any], every: int) -> str:
  """The two losses and their gap every `every` steps, in Markdown."""
  lines = ["| step | ours | HuggingFace | gap (ours - HF) |", "|---|---|---|---|"]
  count = len(report["ours"])
  for step in sorted({1, *range(every, count + 1, every), count}):
    i = step - 1
    lines.append(f"| {step:,} | {report['ours'][i]:.4f} | {report['hf'][i]:.4f} | "
                 f"{report['gap'][i]:+.4f} |")
  lines.append(f"\nMean gap {report['mean_gap']:+.4f} nats, largest |gap| "
               f"{report['max_abs_gap']:.4f}, over {count:,} steps.")
  return "\n".join(lines)


def main(argv):
  def body():
    report = run_parity(FLAGS.config, FLAGS.workdir, FLAGS.steps, init=FLAGS.init,
                        dropout=FLAGS.dropout, log_every=FLAGS.log_every, threads=FLAGS.threads,
                        log=lambda line: print(line, file=sys.stderr))
    text = json.dumps(report, indent=2)
    for path in [fs.join(FLAGS.workdir, "parity.json")] + ([FLAGS.output] if FLAGS.output
                                                           else []):
      fs.write_atomically(path, text)
    if not all(math.isfinite(x) for x in report["ours"] + report["hf"]):
      raise ParityError("A loss is not finite; see parity.json.")
    print(table(report, FLAGS.log_every))
  cli_errors.run_cli(argv, body, quiet=False)


if __name__ == "__main__":
  define_flags()
  app.run(main)
