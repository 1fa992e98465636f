"""A pretraining or GLUE fine-tuning run as a HuggingFace transformers model folder: the
tensors, the folder, export_pretrained and export_finetuned. The library behind
`python -m script_jax.interop.hf`, whose docstring lists the classes written.

Importing (HuggingFace folder -> our parameters, for fine-tuning and continued pretraining) is
in hf_import; its entry points are re-exported below. docs/export.md has the whole story.
"""

from __future__ import annotations

from typing import Optional

import jax
import numpy as np

from script_jax import checkpoints
from script_jax import cli_errors
from script_jax import fs
from script_jax import models
from script_jax.data import prepared_folder
from script_jax.finetune import glue_data
from script_jax.finetune import model as task_models
from script_jax.finetune import seed_runs
from script_jax.finetune import trainer
from script_jax.interop import hf_folder
from script_jax.interop import hf_params
from script_jax.interop import hf_tokenizer
from script_jax.interop.hf_folder import HFFolderError, is_hf_folder  # pylint: disable=unused-import
from script_jax.interop.hf_import import (  # pylint: disable=unused-import
    check_pretraining_config, finetune_start, is_hf_init, load_hf_folder, pretraining_params)

__all__ = ["ExportError", "HFFolderError", "check_pretraining_config", "classifier_tensors",
           "discriminator_tensors", "export_finetuned", "export_pretrained", "finetune_start",
           "is_hf_folder", "is_hf_init", "load_hf_folder", "mlm_tensors", "pretraining_params",
           "write_folder"]

PARTS = ("discriminator", "generator", "both")
LAYOUTS = hf_params.FAMILIES


class ExportError(cli_errors.UserError):
  """The export was asked for something this run cannot be written as."""


# ----------------------------------------------------------------------------- writing a folder

def _start_folder(output_dir: str, overwrite: bool) -> None:
  config_path = hf_folder.join(output_dir, hf_folder.CONFIG_JSON)
  if hf_folder.exists(config_path) and not overwrite:
    raise ExportError(f"{output_dir} already holds a model ({config_path}); pass --overwrite "
                      "to replace it, or choose another --output_dir.")
  fs.makedirs(output_dir)


def write_folder(output_dir: str, config_json: dict, tensors: dict, tokenizer_files: dict,
                 overwrite: bool = False) -> str:
  """Writes the weights and tokenizer, then config.json last (its presence means complete)."""
  _start_folder(output_dir, overwrite)
  hf_folder.write_safetensors(hf_folder.join(output_dir, hf_folder.SAFETENSORS), tensors)
  for name, data in tokenizer_files.items():
    hf_folder.write_bytes(hf_folder.join(output_dir, name), data)
  fs.write_json_atomically(hf_folder.join(output_dir, hf_folder.CONFIG_JSON), config_json)
  return output_dir


def mlm_tensors(params, cfg: models.EncoderConfig, layout: str, encoder: str = "encoder",
                head: str = "mlm_head", bias: str = "output_bias") -> dict:
  """HuggingFace tensors of an encoder with the tied MLM head (MaskedLM, or ELECTRA's
  generator with encoder="generator", head="generator_head", bias="generator_output_bias")."""
  try:
    entries = hf_params.encoder_entries(cfg, layout, encoder=(encoder,))
  except ValueError as e:
    raise ExportError(f"--layout={layout}: {e}; use --layout=electra.") from None
  entries += hf_params.mlm_head_entries(layout, (head,), (bias,))
  return hf_params.to_hf(params, entries, hf_params.dims_of(cfg))


def discriminator_tensors(params, cfg: models.EncoderConfig) -> dict:
  """HuggingFace ElectraForPreTraining tensors of our ElectraPretrainer's discriminator."""
  entries = (hf_params.encoder_entries(cfg, "electra", encoder=("discriminator",))
             + hf_params.disc_head_entries())
  return hf_params.to_hf(params, entries, hf_params.dims_of(cfg))


def classifier_tensors(params, cfg: models.EncoderConfig) -> dict:
  """HuggingFace ElectraForSequenceClassification tensors of our finetune.model.Classifier."""
  backbone = params["backbone"]
  tensors = hf_params.to_hf(backbone, hf_params.encoder_entries(cfg, "electra"),
                            hf_params.dims_of(cfg))
  last = backbone["encoder"][f"layer_{cfg.num_layers - 1}"]["ffn_norm"]
  tensors.update(hf_params.classifier_to_hf(params["head"]["kernel"], params["head"]["bias"],
                                            last["scale"], last["bias"]))
  return tensors


_MLM_ARCH = {"electra": "ElectraForMaskedLM", "bert": "BertForMaskedLM"}


def export_pretrained(workdir: str, output_dir: str, *, part: Optional[str] = None,
                      step: Optional[int] = None, layout: str = "electra",
                      overwrite: bool = False) -> list[str]:
  """Writes a pretraining workdir's latest (or given) checkpoint as HuggingFace folder(s);
  returns the folders written."""
  if layout not in LAYOUTS:
    raise ExportError(f"--layout={layout!r}: use one of {', '.join(LAYOUTS)}.")
  if not hf_folder.exists(workdir):
    raise ExportError(f"The workdir {workdir} does not exist.")
  config, _, params = checkpoints.load_pretrained(workdir, step)
  params = jax.device_get(models.unstack_layers(params))
  tokenizer, special_ids = prepared_folder.load_workdir_tokenizer(workdir, config)
  cfg = models.encoder_config_from(config.model, scan_layers=False, remat=False)
  files = hf_tokenizer.tokenizer_files(tokenizer, special_ids, cfg.max_position_embeddings)
  provenance = lambda p: {"script_jax": {"objective": config.objective, "part": p,
                                         "workdir": workdir, "step": step}}
  pad = special_ids["pad"]
  if config.objective != "electra":
    if part is not None:
      raise ExportError(f"--part={part} is for ELECTRA workdirs; {workdir} was pretrained with "
                        f"{config.objective}, one model: leave --part out.")
    tensors = mlm_tensors(params, cfg, layout)
    hf_config = hf_folder.hf_config_dict(cfg, _MLM_ARCH[layout], layout, pad,
                                         **provenance("model"))
    return [write_folder(output_dir, hf_config, tensors, files, overwrite)]
  part = part or "discriminator"
  written = []
  if part in ("discriminator", "both"):
    if layout != "electra":
      raise ExportError("ELECTRA's discriminator has no BERT class; use --layout=electra.")
    target = hf_folder.join(output_dir, "discriminator") if part == "both" else output_dir
    hf_config = hf_folder.hf_config_dict(cfg, "ElectraForPreTraining", "electra", pad,
                                         **provenance("discriminator"))
    written.append(write_folder(target, hf_config, discriminator_tensors(params, cfg), files,
                                overwrite))
  if part in ("generator", "both"):
    gen_cfg = models.generator_config(config)
    target = hf_folder.join(output_dir, "generator") if part == "both" else output_dir
    tensors = mlm_tensors(params, gen_cfg, layout, "generator", "generator_head",
                          "generator_output_bias")
    hf_config = hf_folder.hf_config_dict(gen_cfg, _MLM_ARCH[layout], layout, pad,
                                         **provenance("generator"))
    written.append(write_folder(target, hf_config, tensors, files, overwrite))
  return written


def _finetuned_start(run_dir: str, workdir: Optional[str]):
  """(config, tokenizer, special_ids, workdir) a GLUE run was fine-tuned from."""
  if not workdir:
    output_dir = "/".join(run_dir.split("/")[:-2]) or "."  # OUT of OUT/<task>/seed_<s>
    workdir = seed_runs.read_results(output_dir).get("init_from")
    if not workdir:
      raise ExportError(f"No results.json with init_from above {run_dir}: pass --workdir, the "
                        "pretraining workdir (or HuggingFace folder) it was fine-tuned from.")
  if is_hf_init(workdir):
    config, _, tokenizer, special_ids = finetune_start(workdir)
    return config, tokenizer, special_ids, workdir
  config = checkpoints.read_run_config(workdir)
  tokenizer, special_ids = prepared_folder.load_workdir_tokenizer(workdir, config)
  return config, tokenizer, special_ids, workdir


def export_finetuned(run_dir: str, output_dir: str, *, workdir: Optional[str] = None,
                     task: Optional[str] = None, overwrite: bool = False) -> str:
  """Writes a GLUE run's saved parameters (OUT/<task>/seed_<s>/params) as an
  ElectraForSequenceClassification folder; returns it."""
  run_dir = run_dir.rstrip("/")
  if run_dir.endswith("/params"):
    run_dir = run_dir[:-len("/params")]
  params_path = hf_folder.join(run_dir, "params")
  if not hf_folder.exists(params_path):
    raise ExportError(f"{params_path} does not exist: fine-tune with --config.save_model=True "
                      "to keep the parameters, and give --finetuned=OUT/<task>/seed_<s>.")
  parts = run_dir.split("/")
  task = task or (parts[-2] if len(parts) >= 2 else None)
  try:
    spec = glue_data.get_task(task or "")
  except ValueError:
    raise ExportError(f"Cannot tell the GLUE task of {run_dir} (got {task!r}); pass --task "
                      f"(one of {', '.join(glue_data.TASKS)}).") from None
  config, tokenizer, special_ids, workdir = _finetuned_start(run_dir, workdir)
  cfg = models.encoder_config_from(config.model, scan_layers=False, remat=False)
  model = task_models.Classifier(cfg, spec.num_outputs)
  ids = np.zeros((1, 2), np.int32)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, ids, ids + 1))["params"]
  try:
    params = trainer.load_params(trainer.resolved(params_path), abstract)
  except (ValueError, KeyError, TypeError) as e:
    raise ExportError(f"{params_path} does not fit a {spec.display_name} classifier on "
                      f"{workdir}'s encoder ({type(e).__name__}: {str(e)[:300]}); pass the "
                      "--workdir and --task it was fine-tuned with.") from None
  params = jax.device_get(params)
  if spec.is_regression:
    # Trained on the score / 5 (ELECTRA's RegressionTask): the exported head gives the score.
    params = {**params, "head": {k: np.asarray(v) * spec.regression_scale
                                 for k, v in params["head"].items()}}
    labels, problem = {0: "score"}, "regression"
  else:
    labels, problem = dict(enumerate(spec.labels)), "single_label_classification"
  hf_config = hf_folder.hf_config_dict(
      cfg, "ElectraForSequenceClassification", "electra", special_ids["pad"],
      num_labels=spec.num_outputs, id2label={str(k): v for k, v in labels.items()},
      label2id={v: k for k, v in labels.items()}, problem_type=problem,
      finetuning_task=spec.name,
      script_jax={"objective": config.objective, "part": "classifier", "task": spec.name,
                  "workdir": workdir, "run": run_dir})
  files = hf_tokenizer.tokenizer_files(tokenizer, special_ids, cfg.max_position_embeddings)
  return write_folder(output_dir, hf_config, classifier_tensors(params, cfg), files, overwrite)
