"""Start from a HuggingFace ELECTRA or BERT folder: fine-tuning, or continued pretraining.

  finetune_start(folder) -> (config, encoder, tokenizer, special_ids)   for finetune/seed_runs.py
  check_pretraining_config(init_from, config)                            before data preparation
  pretraining_params(init_from, config, fresh_params) -> (params, report)   for train.py
  load_hf_folder(folder, objective=None) -> (config, params, tokenizer)  all in one

What each objective takes from which folder (what is missing starts from the run's own
initialisation, and the report says so):

  script, mlm   one folder. Encoder always; the MLM head (dense, LayerNorm, output bias; the
                decoder is the word embeddings) from ElectraForMaskedLM (a generator) or
                BertForMaskedLM / BertForPreTraining. From a discriminator, a base model or a
                classifier the MLM head starts fresh.
  electra       "DISC" or "DISC,GEN" (or a folder with discriminator/ and generator/, as
                our export of --part=both writes). The discriminator's encoder and, from
                ElectraForPreTraining, its head; the generator from GEN when given (its MLM head
                when it has one), else fresh at config.electra's sizes. ELECTRA shares the
                embeddings: the discriminator's are used, and GEN must have the same
                vocabulary, embedding size, positions and token types.

Refused, with the difference named: another model_type, a hidden_act other than exact GELU,
layer_norm_eps other than 1e-12, relative position embeddings, an output layer not tied to
the word embeddings, tensors whose shapes differ from config.json, and for pretraining any size
or tokenizer that differs from the run's config (the message lists the flags that fix it).
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import numpy as np

from script_jax import config_lib
from script_jax import models
from script_jax import state as state_lib
from script_jax.data import prepared_folder
from script_jax.data import tokenizers
from script_jax.interop import hf_folder
from script_jax.interop import hf_params
from script_jax.interop import hf_tokenizer
from script_jax.interop.hf_folder import HFFolderError

# Our config keys of each EncoderConfig size, for the discriminator (or MaskedLM) and generator.
_MODEL_KEYS = {"vocab_size": "model.vocab_size", "embedding_size": "model.embedding_size",
               "hidden_size": "model.hidden_size", "num_layers": "model.num_layers",
               "num_heads": "model.num_heads", "intermediate_size": "model.intermediate_size",
               "max_position_embeddings": "model.max_position_embeddings",
               "type_vocab_size": "model.type_vocab_size"}
_GENERATOR_KEYS = {"hidden_size": "electra.generator_hidden_size",
                   "num_heads": "electra.generator_num_heads",
                   "intermediate_size": "electra.generator_intermediate_size",
                   "num_layers": "electra.generator_num_layers"}
_SHARED = ("vocab_size", "embedding_size", "max_position_embeddings", "type_vocab_size")


def _lookup(config, dotted: str) -> Any:
  for part in dotted.split("."):
    config = config[part]
  return config


def _abstract(module):
  """The parameter shapes of an encoder module (MaskedLM), without computing them."""
  ids = np.zeros((1, 2), np.int32)
  return jax.eval_shape(lambda: module.init(jax.random.key(0), ids, ids, ids + 1))["params"]


def _load(folder: hf_folder.Folder, entries, abstract, into: dict) -> dict:
  """Fills `into` with the entries' tensors after checking every shape against `abstract`."""
  dims = hf_params.dims_of(folder.cfg)
  problems = hf_params.shape_problems(folder.state, entries, abstract, dims)
  if problems:
    raise HFFolderError(f"{folder.path}: the weights do not fit its config.json:\n  " +
                        "\n  ".join(problems[:12]) +
                        (f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""))
  return hf_params.from_hf(folder.state, entries, dims, into)


def _mlm_tree(folder: hf_folder.Folder) -> tuple[dict, list[str]]:
  """MaskedLM-shaped parameters {embeddings, encoder[, mlm_head, output_bias]} and the names of
  the parts it lacks."""
  abstract = _abstract(models.MaskedLM(folder.cfg))
  entries = hf_params.encoder_entries(folder.cfg, folder.family)
  missing = ["mlm_head", "output_bias"]
  if folder.has_mlm_head:
    entries += hf_params.mlm_head_entries(folder.family)
    missing = []
  return _load(folder, entries, abstract, {}), missing


def _host_copy(x) -> np.ndarray:
  """A NumPy copy of a replicated parameter, also where other hosts hold copies of it."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(x)
  return np.asarray(x.addressable_data(0))  # the trainer's state is replicated: a full copy


def _merge(base: dict, new: dict) -> dict:
  """`base` with every leaf that `new` has replaced (same tree as `base`)."""
  extra = set(new) - set(base)
  if extra:
    raise HFFolderError(f"imported parameters {sorted(extra)} have no place in the model.")
  return {k: (_merge(v, new[k]) if isinstance(v, dict) else new[k]) if k in new else v
          for k, v in base.items()}


# ----------------------------------------------------------------------------- the run config

def run_config(folder: hf_folder.Folder, objective: Optional[str] = None):
  """A run config (config_lib.base_config) with the folder's sizes and tokenizer file; the
  objective is `objective`, else ELECTRA for a discriminator, else SCRIPT."""
  c = config_lib.base_config()
  cfg = folder.cfg
  c.objective = objective or ("electra" if folder.has_disc_head else "script")
  for field, key in _MODEL_KEYS.items():
    section, name = key.split(".")
    c[section][name] = getattr(cfg, field)
  c.model.dropout_rate = cfg.dropout_rate
  c.model.attention_dropout_rate = cfg.attention_dropout_rate
  c.model.initializer_range = cfg.initializer_range
  c.model.vocab_pad_multiple = cfg.vocab_pad_multiple
  # ELECTRA's generator convention when none is given: a quarter of the width, same depth.
  c.electra.generator_hidden_size = max(1, cfg.hidden_size // 4)
  c.electra.generator_num_heads = max(1, cfg.num_heads // 4)
  c.electra.generator_intermediate_size = max(1, cfg.intermediate_size // 4)
  c.electra.generator_num_layers = cfg.num_layers
  c.seq_len = min(c.seq_len, cfg.max_position_embeddings)
  c.mask.max_predictions_per_seq = config_lib.max_predictions_for(c.seq_len)
  spm = hf_folder.join(folder.path, hf_tokenizer.SPM_MODEL)
  if hf_folder.exists(spm):
    c.data.tokenizer, c.data.vocab_file = "sentencepiece", spm
  else:
    c.data.tokenizer = "wordpiece"
    c.data.vocab_file = hf_folder.join(folder.path, hf_tokenizer.VOCAB_TXT)
  return c


def _tokenizer(folder: hf_folder.Folder):
  tokenizer, special_ids = hf_tokenizer.load_folder_tokenizer(folder.path)
  if tokenizer.vocab_size != folder.cfg.vocab_size:
    raise HFFolderError(f"{folder.path}: the tokenizer has {tokenizer.vocab_size} entries, the "
                        f"model's vocab_size is {folder.cfg.vocab_size}.")
  return tokenizer, special_ids


# ----------------------------------------------------------------------------- fine-tuning

def _encoder_folder(path: str) -> str:
  folder = hf_folder.encoder_folder(path)
  if folder is None:
    first = path.split(",")[0]
    raise HFFolderError(f"The HuggingFace folder {first} does not exist." if not
                        hf_folder.exists(first) else
                        f"{first} has no {hf_folder.CONFIG_JSON}: not a HuggingFace model folder "
                        "(give the folder save_pretrained() wrote, or a downloaded snapshot).")
  return folder


def finetune_start(path: str, vocab_pad_multiple: Optional[int] = None):
  """(config, encoder {"embeddings", "encoder"} as NumPy, tokenizer, special_ids) of a folder,
  as finetune/seed_runs.py load_start needs them. Any ELECTRA/BERT folder: heads are dropped."""
  folder_path = _encoder_folder(path)
  pad = config_lib.base_config().model.vocab_pad_multiple
  folder = hf_folder.read_folder(folder_path, pad if vocab_pad_multiple is None
                                 else vocab_pad_multiple)
  config = run_config(folder)
  tokenizer, special_ids = _tokenizer(folder)
  abstract = _abstract(models.MaskedLM(folder.cfg))
  encoder = _load(folder, hf_params.encoder_entries(folder.cfg, folder.family), abstract, {})
  return config, encoder, tokenizer, special_ids


# ----------------------------------------------------------------------------- pretraining

def is_hf_init(init_from: str) -> bool:
  """Whether config.init_from names HuggingFace folders rather than a workdir."""
  # A workdir's path has no comma; "DISC,GEN" names two folders even before they exist.
  return bool(init_from) and ("," in init_from or hf_folder.encoder_folder(init_from) is not None)


def _sources(init_from: str, objective: str) -> tuple[str, Optional[str]]:
  """(the encoder's folder, the ELECTRA generator's folder or None)."""
  parts = [p for p in init_from.split(",") if p]
  if len(parts) > 2 or (len(parts) == 2 and objective != "electra"):
    raise HFFolderError(f"init_from={init_from!r}: give one folder, or for the electra "
                        "objective two: DISCRIMINATOR,GENERATOR.")
  if len(parts) == 2:
    return parts[0], parts[1]
  both = [hf_folder.join(parts[0], n) for n in ("discriminator", "generator")]
  if not hf_folder.is_hf_folder(parts[0]) and all(hf_folder.is_hf_folder(p) for p in both):
    return both[0], (both[1] if objective == "electra" else None)
  return parts[0], None


def _size_problems(cfg: models.EncoderConfig, config, keys: dict[str, str], path: str) -> list[str]:
  return [f"{key}: {path} has {getattr(cfg, field)}, the config {_lookup(config, key)} "
          f"(--config.{key}={getattr(cfg, field)})"
          for field, key in keys.items() if getattr(cfg, field) != _lookup(config, key)]


def _tokenizer_problems(folder: hf_folder.Folder, config) -> list[str]:
  spm = hf_folder.join(folder.path, hf_tokenizer.SPM_MODEL)
  kind, path = (("sentencepiece", spm) if hf_folder.exists(spm) else
                ("wordpiece", hf_folder.join(folder.path, hf_tokenizer.VOCAB_TXT)))
  if not hf_folder.exists(path):
    return [f"{folder.path} has no {hf_tokenizer.VOCAB_TXT} or {hf_tokenizer.SPM_MODEL} to "
            "tokenize the pretraining data with"]
  fix = f"(--config.data.tokenizer={kind} --config.data.vocab_file={path})"
  if prepared_folder.tokenizer_kind(config.data.tokenizer)[0] != kind:
    return [f"data.tokenizer: the folder's tokenizer is {kind}, the config's "
            f"{config.data.tokenizer!r} {fix}"]
  vocab_file = config.data.vocab_file
  if not vocab_file or tokenizers.file_sha256(vocab_file) != tokenizers.file_sha256(path):
    return [f"data.vocab_file: {vocab_file or 'empty (a tokenizer trained on the corpus)'}, not "
            f"the folder's {path} {fix}"]
  return []


def _folders(init_from: str, config):
  pad = config.model.vocab_pad_multiple
  disc_path, gen_path = _sources(init_from, config.objective)
  disc = hf_folder.read_folder(disc_path, pad)
  gen = hf_folder.read_folder(gen_path, pad) if gen_path else None
  return disc, gen


def check_pretraining_config(init_from: str, config) -> None:
  """HFFolderError listing every size and tokenizer setting of `config` that differs from the
  folders of `init_from` (with the flags that fix them). Call it before preparing data."""
  _check(*_folders(init_from, config), config, init_from)


def _check(disc: hf_folder.Folder, gen: Optional[hf_folder.Folder], config,
           init_from: str) -> None:
  problems = _size_problems(disc.cfg, config, _MODEL_KEYS, disc.path)
  problems += _tokenizer_problems(disc, config)
  if gen is not None:
    problems += [f"ELECTRA shares the embeddings: the generator {gen.path} has {field} "
                 f"{getattr(gen.cfg, field)}, the discriminator {getattr(disc.cfg, field)}"
                 for field in _SHARED if getattr(gen.cfg, field) != getattr(disc.cfg, field)]
    problems += _size_problems(gen.cfg, config, _GENERATOR_KEYS, gen.path)
  if problems:
    raise HFFolderError(f"init_from={init_from}: the run's config does not "
                        "match the HuggingFace model:\n  " + "\n  ".join(problems))


def pretraining_params(init_from: str, config, fresh_params) -> tuple[dict, list[str]]:
  """Parameters for models.build_model(config) (in its layout), from `init_from`'s folders,
  with what they lack taken from `fresh_params` (the run's own initialisation); and a report,
  one line per part, of where each came from."""
  disc, gen = _folders(init_from, config)
  _check(disc, gen, config, init_from)
  params = jax.tree.map(_host_copy, models.unstack_layers(fresh_params))
  loaded: dict = {}
  fresh: list[str] = []
  if config.objective == "electra":
    abstract = params
    entries = hf_params.encoder_entries(disc.cfg, disc.family, encoder=("discriminator",))
    if disc.has_disc_head:
      entries += hf_params.disc_head_entries()
    else:
      fresh += ["disc_dense", "disc_output"]
    _load(disc, entries, abstract, loaded)
    report = [f"embeddings, discriminator{', disc head' if disc.has_disc_head else ''}: "
              f"{disc.path}"]
    if gen is None:
      fresh += ["generator", "generator_head", "generator_output_bias"]
    else:
      gen_entries = hf_params.encoder_entries(gen.cfg, gen.family, embeddings=("gen_emb",),
                                              encoder=("generator",))
      if gen.has_mlm_head:
        gen_entries += hf_params.mlm_head_entries(gen.family, ("generator_head",),
                                                  ("generator_output_bias",))
      else:
        fresh += ["generator_head", "generator_output_bias"]
      gen_abstract = {**abstract, "gen_emb": abstract["embeddings"]}
      gen_tree = _load(gen, gen_entries, gen_abstract, {})
      differ = max(float(np.max(np.abs(a - b))) for a, b in zip(
          jax.tree.leaves(gen_tree.pop("gen_emb")), jax.tree.leaves(loaded["embeddings"])))
      loaded.update(gen_tree)
      report.append(f"generator{', generator head' if gen.has_mlm_head else ''}: {gen.path}"
                    + (f" (its own embeddings differ from the discriminator's by up to "
                       f"{differ:.3g}; the discriminator's are used, as ELECTRA shares them)"
                       if differ > 0 else ""))
  else:
    loaded, missing = _mlm_tree(disc)
    fresh += missing
    report = [f"embeddings, encoder{'' if missing else ', MLM head'}: {disc.path}"]
  if fresh:
    report.append("initialised fresh: " + ", ".join(fresh))
  merged = _merge(params, loaded)
  bad = [f"{jax.tree_util.keystr(path)}: {np.shape(new)}, the model {np.shape(old)}"
         for (path, old), new in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                     jax.tree.leaves(merged)) if np.shape(old) != np.shape(new)]
  if bad:
    raise HFFolderError(f"{init_from}: the imported parameters do not fit the model: "
                        f"{'; '.join(bad[:8])}.")
  return models.to_layout(merged, config.model.scan_layers), report


def load_hf_folder(path: str, objective: Optional[str] = None, seed: int = 0):
  """(config, params, tokenizer) from a HuggingFace folder (or "DISC,GEN" for electra): the run
  config with its sizes and tokenizer, and parameters for models.build_model(config) (see the
  module docstring for what starts fresh)."""
  pad = config_lib.base_config().model.vocab_pad_multiple
  folder = hf_folder.read_folder(_encoder_folder(path), pad)
  config = run_config(folder, objective)
  config.init_from = path
  if config.objective == "electra":
    _, gen_path = _sources(path, "electra")
    if gen_path:  # the generator's sizes are the folder's
      gen_cfg = hf_folder.read_folder(gen_path, pad).cfg
      for field, key in _GENERATOR_KEYS.items():
        config.electra[key.split(".")[1]] = getattr(gen_cfg, field)
  tokenizer, _ = _tokenizer(folder)
  model = models.build_model(config)
  fresh = jax.jit(lambda rng: state_lib.init_params(config, model, rng))(jax.random.key(seed))
  params, _ = pretraining_params(path, config, fresh)
  return config, params, tokenizer
