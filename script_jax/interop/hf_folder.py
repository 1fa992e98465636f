"""A HuggingFace model folder on disk (local or gs://): config.json, the weights, reading and
writing them, and the checks that a folder is an ELECTRA or BERT that our encoder can be.

Weights are read from model.safetensors (or its sharded index), else pytorch_model.bin (which
needs torch), and written as model.safetensors with NumPy: neither direction needs torch.
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Any, Optional

import numpy as np

from script_jax import cli_errors
from script_jax import fs
from script_jax import models

CONFIG_JSON = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"
MODEL_TYPES = ("electra", "bert")
# HuggingFace's defaults for keys a config.json may leave out (ElectraConfig, BertConfig).
_HF_DEFAULTS = {"max_position_embeddings": 512, "type_vocab_size": 2, "hidden_act": "gelu",
                "layer_norm_eps": 1e-12, "hidden_dropout_prob": 0.1,
                "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02,
                "position_embedding_type": "absolute"}
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "intermediate_size")
# GELU flavours equal to ours (jax.nn.gelu(approximate=False), the erf form).
EXACT_GELU = ("gelu", "gelu_python")
LN_EPS = models._LN_EPS  # pylint: disable=protected-access


class HFFolderError(cli_errors.UserError):
  """A HuggingFace folder that is missing, of another architecture, or does not fit."""


join, exists, read_bytes = fs.join, fs.exists, fs.read_bytes


def write_bytes(path: str, data: bytes) -> None:
  """Writes through a temporary name, so a reader never sees half a file."""
  fs.write_atomically(path, data)


def read_json(path: str) -> dict:
  """A JSON file of the folder; HFFolderError when it is absent or not JSON."""
  return fs.read_json_for_user(path, HFFolderError)


def is_hf_folder(path: str) -> bool:
  """Whether `path` looks like a HuggingFace model folder (config.json, no run_config.json)."""
  try:
    return bool(path) and exists(join(path, CONFIG_JSON)) and not exists(
        join(path, "run_config.json"))
  except Exception:  # pylint: disable=broad-except
    return False  # an unreachable or malformed path is not a folder to import


# ----------------------------------------------------------------------------- weights

def _safetensors():
  try:
    from safetensors import numpy as st  # pylint: disable=g-import-not-at-top  (optional: safetensors)
  except ImportError:
    raise HFFolderError("Reading and writing HuggingFace folders needs the safetensors package: "
                        "pip install -e '.[hf]' (or pip install safetensors).") from None
  return st


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
  """model.safetensors with the metadata transformers expects."""
  data = _safetensors().save({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                             metadata={"format": "pt"})
  write_bytes(path, data)


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
  try:
    return dict(_safetensors().load(read_bytes(path)))
  except Exception as e:  # pylint: disable=broad-except
    if isinstance(e, HFFolderError):
      raise
    raise HFFolderError(f"{path} could not be read as safetensors ({type(e).__name__}: "
                        f"{str(e)[:200]}).") from None


def _load_pytorch_bin(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top  (optional: torch)
  except ImportError:
    raise HFFolderError(f"{path} is a PyTorch pickle, which needs torch to read: install torch, "
                        "or save the model with transformers' save_pretrained (safetensors)."
                        ) from None
  state = torch.load(io.BytesIO(read_bytes(path)), map_location="cpu", weights_only=True)
  return {k: v.float().numpy() for k, v in state.items() if hasattr(v, "numpy")}


def load_state(folder: str) -> dict[str, np.ndarray]:
  """Every tensor of the folder's weights, by HuggingFace name, as NumPy float32."""
  single, index, pickle = (join(folder, n) for n in (SAFETENSORS, SAFETENSORS_INDEX, PYTORCH_BIN))
  if exists(single):
    state = _load_safetensors(single)
  elif exists(index):
    files = sorted(set(read_json(index).get("weight_map", {}).values()))
    state = {}
    for name in files:
      state.update(_load_safetensors(join(folder, name)))
  elif exists(pickle):
    state = _load_pytorch_bin(pickle)
  else:
    found = sorted(fs.listdir(folder))
    hint = (" It has only TensorFlow or Flax weights: load it in transformers and "
            "save_pretrained() it to get model.safetensors." if any(
                n.endswith((".h5", ".msgpack")) for n in found) else "")
    raise HFFolderError(f"{folder} has no weights: none of {SAFETENSORS}, {SAFETENSORS_INDEX}, "
                        f"{PYTORCH_BIN}. Files there: {', '.join(found) or 'none'}.{hint}")
  return {k: np.asarray(v, np.float32) for k, v in state.items()}


def normalise_names(state: dict[str, np.ndarray], family: str) -> dict[str, np.ndarray]:
  """Names as today's transformers writes them: LayerNorm gamma/beta (old BERT checkpoints)
  become weight/bias, and a bare base model's names get the `electra.`/`bert.` prefix."""
  out = {}
  base = ("embeddings.", "embeddings_project.", "encoder.", "pooler.")
  for name, value in state.items():
    if ".LayerNorm." in name or name.startswith("LayerNorm."):
      name = name.replace(".gamma", ".weight").replace(".beta", ".bias")
    if name.startswith(base):
      name = f"{family}.{name}"
    out[name] = value
  return out


# ----------------------------------------------------------------------------- config.json

def encoder_config_problems(hf: dict) -> list[str]:
  """What in a config.json our encoder cannot reproduce (empty when it can)."""
  get = lambda k: hf.get(k, _HF_DEFAULTS.get(k))
  problems = [f"{k} is missing" for k in _REQUIRED if k not in hf]
  if get("hidden_act") not in EXACT_GELU:
    problems.append(f"hidden_act {get('hidden_act')!r} (script_jax's layers use the exact erf "
                    "GELU, 'gelu')")
  if not math.isclose(float(get("layer_norm_eps")), LN_EPS, rel_tol=1e-3):
    problems.append(f"layer_norm_eps {get('layer_norm_eps')} (script_jax's LayerNorms use "
                    f"{LN_EPS})")
  if get("position_embedding_type") not in (None, "absolute"):
    problems.append(f"position_embedding_type {get('position_embedding_type')!r} (script_jax "
                    "has absolute position embeddings)")
  for flag in ("is_decoder", "add_cross_attention"):
    if hf.get(flag):
      problems.append(f"{flag}=true (script_jax's encoder is bidirectional, without "
                      "cross-attention)")
  if "hidden_size" in hf and "num_attention_heads" in hf and (
      hf["hidden_size"] % hf["num_attention_heads"]):
    problems.append(f"hidden_size {hf['hidden_size']} is not divisible by num_attention_heads "
                    f"{hf['num_attention_heads']}")
  return problems


def encoder_config(hf: dict, family: str, embedding_size: int,
                   vocab_pad_multiple: int = 1) -> models.EncoderConfig:
  """Our EncoderConfig of a checked config.json (see encoder_config_problems)."""
  get = lambda k: hf.get(k, _HF_DEFAULTS.get(k))
  return models.EncoderConfig(
      vocab_size=int(hf["vocab_size"]),
      embedding_size=int(embedding_size if family == "electra" else hf["hidden_size"]),
      hidden_size=int(hf["hidden_size"]), num_layers=int(hf["num_hidden_layers"]),
      num_heads=int(hf["num_attention_heads"]), intermediate_size=int(hf["intermediate_size"]),
      max_position_embeddings=int(get("max_position_embeddings")),
      type_vocab_size=int(get("type_vocab_size")),
      dropout_rate=float(get("hidden_dropout_prob")),
      attention_dropout_rate=float(get("attention_probs_dropout_prob")),
      initializer_range=float(get("initializer_range")),
      vocab_pad_multiple=vocab_pad_multiple)


def hf_config_dict(cfg: models.EncoderConfig, architecture: str, family: str, pad_id: int,
                   **extra: Any) -> dict:
  """config.json of an ELECTRA or BERT with the sizes of `cfg` (vocabulary unpadded)."""
  config = {
      "architectures": [architecture], "model_type": family,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "intermediate_size": cfg.intermediate_size, "hidden_act": "gelu",
      "hidden_dropout_prob": cfg.dropout_rate,
      "attention_probs_dropout_prob": cfg.attention_dropout_rate,
      "max_position_embeddings": cfg.max_position_embeddings,
      "type_vocab_size": cfg.type_vocab_size, "initializer_range": cfg.initializer_range,
      "layer_norm_eps": LN_EPS,
      "pad_token_id": int(pad_id), "position_embedding_type": "absolute",
      "tie_word_embeddings": True, "is_decoder": False,
  }
  if family == "electra":
    config["embedding_size"] = cfg.embedding_size
  config.update(extra)
  return config


# ----------------------------------------------------------------------------- a folder, read

@dataclasses.dataclass
class Folder:
  """A checked HuggingFace ELECTRA/BERT folder: its config, sizes and tensors."""
  path: str
  family: str                      # "electra" or "bert"
  hf_config: dict                  # config.json
  cfg: models.EncoderConfig        # our encoder's sizes (vocab_pad_multiple as asked)
  state: dict[str, np.ndarray]     # tensors by today's HuggingFace names
  has_mlm_head: bool
  has_disc_head: bool

  @property
  def architectures(self) -> list[str]:
    return list(self.hf_config.get("architectures") or [])


def _mlm_head_names(family: str) -> tuple[str, str]:
  return (("generator_predictions.dense.weight", "generator_lm_head.weight") if family == "electra"
          else ("cls.predictions.transform.dense.weight", "cls.predictions.decoder.weight"))


def read_folder(path: str, vocab_pad_multiple: int = 1) -> Folder:
  """Reads and checks a HuggingFace folder; HFFolderError names whatever does not fit."""
  if not exists(path):
    raise HFFolderError(f"The HuggingFace folder {path} does not exist.")
  config_path = join(path, CONFIG_JSON)
  if not exists(config_path):
    raise HFFolderError(f"{path} has no {CONFIG_JSON}: not a HuggingFace model folder (give the "
                        "folder save_pretrained() wrote, or a downloaded snapshot).")
  hf = read_json(config_path)
  family = hf.get("model_type")
  if family not in MODEL_TYPES:
    raise HFFolderError(
        f"{config_path} has model_type {family!r} (architectures {hf.get('architectures')}): "
        f"script_jax imports ELECTRA ('electra') and BERT ('bert') models only.")
  problems = encoder_config_problems(hf)
  if problems:
    raise HFFolderError(f"{config_path} describes a model script_jax's encoder cannot "
                        "reproduce:\n  " + "\n  ".join(problems))
  state = normalise_names(load_state(path), family)
  word = state.get(f"{family}.embeddings.word_embeddings.weight")
  if word is None:
    raise HFFolderError(f"{path}'s weights have no {family}.embeddings.word_embeddings.weight: "
                        f"not an {family} model's weights (first names: "
                        f"{', '.join(sorted(state)[:5])}).")
  cfg = encoder_config(hf, family, word.shape[-1], vocab_pad_multiple)
  if family == "electra" and "embedding_size" in hf and hf["embedding_size"] != word.shape[-1]:
    raise HFFolderError(f"{path}: config.json has embedding_size {hf['embedding_size']}, its "
                        f"word embeddings {word.shape}.")
  head_name, decoder_name = _mlm_head_names(family)
  if family == "bert" and "cls.predictions.bias" not in state and (
      "cls.predictions.decoder.bias" in state):
    state["cls.predictions.bias"] = state["cls.predictions.decoder.bias"]
  decoder = state.get(decoder_name)
  if decoder is not None and (decoder.shape != word.shape or not np.array_equal(decoder, word)):
    raise HFFolderError(f"{path}: the output layer {decoder_name} is not tied to the word "
                        "embeddings; script_jax's MLM head is (W is the word embedding matrix).")
  return Folder(path=path, family=family, hf_config=hf, cfg=cfg, state=state,
                has_mlm_head=head_name in state,
                has_disc_head="discriminator_predictions.dense.weight" in state)


def encoder_folder(path: str) -> Optional[str]:
  """The folder holding the encoder for fine-tuning: `path` itself, or path/discriminator (an
  ELECTRA export of both parts), or the first of "DISC,GEN"; None when there is none."""
  first = path.split(",")[0]
  for candidate in (first, join(first, "discriminator") if first else ""):
    if is_hf_folder(candidate):
      return candidate
  return None
