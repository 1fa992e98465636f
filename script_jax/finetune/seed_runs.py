"""What every fine-tuning command shares: the pretrained start, the results file, the seed loop.

  start = load_start(init_from, step, ft)   config, encoder sizes, parameters, tokenizer
  results = read_results(output_dir)        {"runs": {task: {seed: metrics}}, ...}
  run_seeds(seeds, start, task, ...)        per seed: fit, evaluate, save, write the results

Results are written after every (task, seed) run, so an interrupted multi-run command keeps what
it finished and a rerun skips it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Optional

from absl import flags
import jax
from ml_collections import config_flags


from script_jax import checkpoints
from script_jax import cli_errors
from script_jax import fs
from script_jax import models
from script_jax.data import prepared_folder
from script_jax.finetune import model as task_models
from script_jax.interop import hf_import

RESULTS_FILE = "results.json"


class FinetuneError(cli_errors.UserError):
  """Bad fine-tuning input (task, data, checkpoint); the message says what and how to fix it."""


@dataclasses.dataclass
class Start:
  """A pretrained encoder to fine-tune, and the tokenizer it was pretrained with."""
  config: Any              # the pretraining run's config
  encoder_cfg: Any         # models.EncoderConfig with fine-tuning's dropout, per-layer layout
  encoder: dict            # {"embeddings", "encoder"} on the host (numpy); {} if random
  tokenizer: Any
  special_ids: dict[str, int]


def define_start_flags() -> None:
  """The flags every fine-tuning command shares: the recipe and the starting point."""
  config_flags.DEFINE_config_file("config", "configs/finetune.py",
                                  "The fine-tuning recipe (configs/finetune.py).",
                                  lock_config=True)
  flags.DEFINE_string("init_from", None, "Pretraining workdir (any objective) or a "
                      "HuggingFace ELECTRA/BERT folder.")
  flags.DEFINE_integer("step", None, "Its checkpoint step (default: the latest).")
  flags.DEFINE_bool("random_init", False, "Same architecture and tokenizer as --init_from, "
                    "random weights: the baseline that shows what pretraining bought.")


def load_start(init_from: str, step: Optional[int], ft, random_init: bool = False) -> Start:
  """The encoder of a pretraining workdir (any objective) or of a HuggingFace ELECTRA/BERT
  folder (interop/hf_import.py), and its tokenizer. With random_init only the config and the
  tokenizer are read (a workdir needs no checkpoint yet)."""
  if hf_import.is_hf_init(init_from):  # a HuggingFace ELECTRA or BERT folder
    if step is not None:
      raise FinetuneError(f"--step is for pretraining workdirs; {init_from} is a HuggingFace "
                          "folder (one set of weights).")
    config, encoder, tokenizer, special_ids = hf_import.finetune_start(init_from)
    encoder = {} if random_init else encoder
  else:
    if random_init:
      config, encoder = checkpoints.read_run_config(init_from), {}
    else:
      config, _, params = checkpoints.load_pretrained(init_from, step)
      # On the host: each run's device copy is donated to its train step.
      encoder = jax.device_get(checkpoints.encoder_params(config, params))
    tokenizer, special_ids = prepared_folder.load_workdir_tokenizer(init_from, config)
  cfg = models.encoder_config_from(config.model, dropout_rate=ft.dropout_rate,
                                   attention_dropout_rate=ft.attention_dropout_rate,
                                   scan_layers=False, remat=False)
  return Start(config, cfg, encoder, tokenizer, special_ids)


def initial_params(model, start: Start, sample: dict, seed: int, random_init: bool,
                   init_from: str) -> dict:
  """The task model's parameters: a head drawn from `seed`, the pretrained encoder below it
  (or, with random_init, the encoder drawn too)."""
  extra = {k: sample[k][:1] for k in getattr(model, "predict_inputs", ())}
  params = jax.jit(model.init)(jax.random.key(seed), sample["input_ids"][:1],
                               sample["segment_ids"][:1], sample["input_mask"][:1],
                               **extra)["params"]
  if random_init:
    return params
  try:
    return task_models.with_pretrained_encoder(params, start.encoder)
  except ValueError as e:
    raise FinetuneError(f"{init_from}: {e}") from None


def read_results(output_dir: str) -> dict[str, Any]:
  """OUT/results.json, or an empty one."""
  path = fs.join(output_dir, RESULTS_FILE)
  if not fs.exists(path):
    return {"runs": {}}
  try:
    return fs.read_json(path)
  except ValueError as e:
    raise FinetuneError(f"{path} is not valid JSON ({e}); move it away to start over.") from e


@dataclasses.dataclass
class Task:
  """What a fine-tuning command trains, the same for each seed."""
  model: Any               # a Flax module (finetune/model.py)
  loss_fn: Callable        # (outputs, batch) -> (per-example losses, per-example metrics)
  train_arrays: dict       # the training features, [N, ...] each
  epochs: int


@dataclasses.dataclass
class SeedRun:
  """One seed's fine-tuned model, handed to the command's evaluation."""
  seed: int
  run_dir: str             # its logs, predictions and (with save_model) parameters
  params: Any              # the final parameters
  last: dict[str, float]   # the last logged training record
  began: float             # time.time() when the seed started

  @property
  def train_loss(self) -> float:
    return float(self.last.get("loss", float("nan")))


def run_seeds(seeds: list[int], start: Start, task: Task, ft, *, random_init: bool,
              init_from: str, run_dir: Callable[[int], str], label: Callable[[int], str],
              evaluate: Callable[[SeedRun], None], results: dict[str, Any], output_dir: str,
              table: Callable[[dict[str, Any]], str]) -> None:
  """Each seed in turn: its initial parameters, training (trainer.fit) logging into its run
  folder, `evaluate` (which scores it into `results`), the final parameters with
  ft.save_model, then OUT/results.json and OUT/results.md (process 0): an interrupted command
  keeps every seed it finished."""
  from script_jax.finetune import trainer  # pylint: disable=g-import-not-at-top  (cycle: trainer imports seed_runs)
  for seed in seeds:
    began = time.time()
    folder = run_dir(seed)
    init = initial_params(task.model, start, task.train_arrays, seed, random_init, init_from)
    final, last = trainer.fit(task.model, init, task.loss_fn, task.train_arrays, ft, seed=seed,
                              num_layers=start.encoder_cfg.num_layers, epochs=task.epochs,
                              label=label(seed), log_dir=folder)
    evaluate(SeedRun(seed, folder, final, last, began))
    if ft.save_model:
      trainer.save_params(trainer.resolved(fs.join(folder, "params")), final)
    if jax.process_index() == 0:
      fs.write_json_atomically(fs.join(output_dir, RESULTS_FILE), results)
      fs.write_atomically(fs.join(output_dir, "results.md"), table(results))


def check_same_start(results: dict[str, Any], output_dir: str, init_from: str,
                     random_init: bool) -> None:
  """Refuses to mix runs of two starting points in one output folder."""
  if results.get("init_from") not in (None, init_from) or results.get(
      "random_init", random_init) != random_init:
    raise FinetuneError(f"{output_dir} holds results of {results.get('init_from')} "
                        f"(random_init={results.get('random_init')}); use another "
                        "--output_dir.")
