"""The one place where every config key is defined, with its default.

Config files in configs/ start from `base_config()` and write out the paper's numbers (Table 4).
Every key here can be overridden from the command line, e.g. `--config.objective=electra`.
"""

import copy
import os
from typing import Optional

import ml_collections

from script_jax import cli_errors

OBJECTIVES = ("script", "electra", "mlm")
# How replacements are drawn (objectives.py has one function per name).
SAMPLERS = ("gumbel", "inverse_cdf")
DATA_ORDERS = ("buffer", "windows")  # data.order: pipeline.create_pretraining_dataset
# jax.random implementations a run may draw its step randomness from (config.rng_impl); "auto"
# is resolved per platform when the run starts (resolve_rng_impl).
RNG_IMPLS = ("auto", "threefry2x32", "rbg", "unsafe_rbg")
# libtpu's flag that lets XLA's RngBitGenerator draw each shard's bits locally (MaxText sets
# it too); without it the partitioned program makes the global random bits on every device.
LIBTPU_RNG_FLAG = "--xla_tpu_spmd_rng_bit_generator_unsafe=true"
# Where the critic's (SCRIPT's) loss is taken: all non-padding tokens, or the masked ones.
DISC_POSITIONS = ("all", "masked")
# How the critic's logsumexp is computed (objectives.critic_logsumexp).
LOGSUMEXP_IMPLS = ("plain", "pallas")
ATTENTION_IMPLS = ("xla", "pallas")
MLM_HEAD_IMPLS = ("xla", "pallas")
DTYPES = ("float32", "bfloat16")
OPTIMIZER_RECIPES = ("optax", "electra")  # config.optim.recipe (state.make_optimizer)
NONFINITE_POLICIES = ("stop", "skip")  # config.optim.on_nonfinite (train.py)
SQUAD_HEADS = ("electra", "bert")
# ELECTRA's (and BERT's) uncased WordPiece vocab, shipped with the package (Apache-2.0).
BERT_UNCASED_VOCAB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets",
                                  "bert_uncased_vocab.txt")


class ConfigError(cli_errors.UserError):
  """The config is inconsistent; raised at start, before any work is done."""


def resolve_rng_impl(requested: str, platform: str, remat: bool) -> str:
  """config.rng_impl as a jax.random implementation name ("auto": threefry2x32 on every
  platform, with or without remat)."""
  del platform, remat
  # On TPU too: threefry fused into its consumers moves fewer bytes than rbg's materialised
  # bits (the TPU compiler's figures, docs/benchmarks.md, "rng_impl on the TPU compiler").
  return "threefry2x32" if requested == "auto" else requested


def rng_impl_of(config) -> str:
  """The run's jax.random implementation (config.rng_impl; "auto" for the default backend)."""
  import jax  # pylint: disable=g-import-not-at-top  (jax config: main.py sets LIBTPU_INIT_ARGS after importing this)
  return resolve_rng_impl(config.rng_impl, jax.default_backend(), config.model.remat)


def libtpu_init_args(config, current: str) -> str:
  """LIBTPU_INIT_ARGS for a run: `current` plus LIBTPU_RNG_FLAG when the run draws rbg bits
  (rng_impl rbg or unsafe_rbg). Set before JAX starts; libtpu alone reads it, so elsewhere it
  changes nothing."""
  may_use_rbg = config.rng_impl in ("rbg", "unsafe_rbg")
  if not may_use_rbg or "xla_tpu_spmd_rng_bit_generator_unsafe" in current:
    return current
  return f"{current} {LIBTPU_RNG_FLAG}".strip()


def max_predictions_for(seq_len: int, mask_prob: float = 0.15) -> int:
  """ELECTRA's fixed number of MLM predictions per sequence: int((p + 0.005) * T)."""
  return int((mask_prob + 0.005) * seq_len)


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by every config (ELECTRA-small-like; configs override the sizes)."""
  c = ml_collections.ConfigDict()
  c.objective = "script"  # one of OBJECTIVES
  c.seed = 0
  # How replacements are drawn from softmax(logits / tau) (script and electra): "gumbel" is the
  # paper's Gumbel-max; "inverse_cdf" draws from the same distribution with one uniform per
  # position (cheaper on CPU, a different random stream).
  c.sampler = "gumbel"
  # The MLM head at the masked positions (every objective's MLM loss and accuracy, SCRIPT's and
  # ELECTRA's sample): "xla", the [B, P, V] logits in HBM; "pallas", fused kernels that keep
  # them in on-chip memory (fused_logsumexp.pallas_mlm_head; its own Gumbel noise, not
  # jax.random's: the same distribution, other draws; sampler "gumbel" only).
  c.mlm_head_impl = "xla"
  # PRNG behind each step's dropout masks and samples (init always uses threefry2x32, so the
  # initial parameters do not depend on it). "auto": "threefry2x32" on every platform (on TPU
  # it moves fewer bytes than "rbg", XLA's RngBitGenerator: docs/benchmarks.md); "rbg" and
  # "unsafe_rbg" on request (drawn per shard with LIBTPU_RNG_FLAG, which main.py sets; with
  # model.remat recomputed rbg bits may differ from the forward pass's, jax-ml/jax#21046).
  # The run records the resolved name and a resume must use the same (the stream changes).
  # threefry2x32 is the one stream that is the same on every platform and device count.
  c.rng_impl = "auto"

  # Model (ELECTRA/BERT encoder). vocab_size must match the tokenizer's.
  c.model = ml_collections.ConfigDict()
  c.model.vocab_size = 30522
  c.model.embedding_size = 128
  c.model.hidden_size = 256
  c.model.num_layers = 12
  c.model.num_heads = 4
  c.model.intermediate_size = 1024
  c.model.max_position_embeddings = 512
  c.model.type_vocab_size = 2
  c.model.dropout_rate = 0.1
  c.model.attention_dropout_rate = 0.1
  c.model.dtype = "float32"  # "bfloat16": bf16 compute, f32 params, f32 softmax/logsumexp
  c.model.initializer_range = 0.02  # BERT's truncated-normal stddev
  c.model.remat = False  # rematerialise each transformer layer in the backward pass
  # Scan one layer body over stacked parameters: compiles once; with remat it is what bounds
  # activation memory on XLA:CPU. Changes the checkpoint layout (models.unstack_layers converts).
  c.model.scan_layers = False
  # Softmax rows padded to a multiple of this (128 suits TPU/GPU tiles; pad columns are masked).
  c.model.vocab_pad_multiple = 128
  # Query/key/value projections as one matmul (same parameters and checkpoints; meant to cut
  # GPU kernels; opt-in, measured in docs/benchmarks.md section 5.4).
  c.model.fused_qkv = False
  # "pallas": each layer's attention and its dropout in one kernel, the [B, N, T, T] scores in
  # on-chip memory (fused_attention.py; its own dropout masks, not jax.random's); "xla": einsums
  # and a softmax that XLA fuses (docs/benchmarks.md 7.9).
  c.model.attention_impl = "xla"

  # Weight of the critic's loss: SCRIPT's alpha (Section 2: L = L_MLM + alpha * L_Disc), and
  # ELECTRA's lambda on its discriminator's loss (the same knob, one value for both).
  c.disc_weight = 50.0

  # SCRIPT (paper Section 2).
  c.script = ml_collections.ConfigDict()
  # > 0: the critic's logsumexp over the vocabulary in chunks of about this many tokens (every
  # sequence's next logsumexp_chunk // B positions), so the B x T x V logits never exist at
  # once; 0: the whole vocabulary at once.
  c.script.logsumexp_chunk = 0
  # "pallas": the critic's logsumexp and its gradient by fused matmul + logsumexp kernels, the
  # logits a tile at a time in on-chip memory (fused_logsumexp.py; the TPU compiler's figures in
  # docs/benchmarks.md); "plain": the formula (with logsumexp_chunk).
  c.script.logsumexp_impl = "plain"
  c.script.temperature = 1.0  # tau of the Gumbel-max sample
  c.script.disc_positions = "all"  # "all" non-padding positions or "masked" positions only

  # ELECTRA baseline: generator 1/4 of the discriminator's hidden size, shared embeddings.
  c.electra = ml_collections.ConfigDict()
  c.electra.generator_hidden_size = 64
  c.electra.generator_num_heads = 1
  c.electra.generator_intermediate_size = 256
  c.electra.generator_num_layers = 12
  c.electra.temperature = 1.0

  # Batches and masking (paper appendix: 15%, of those 80% [MASK] / 10% kept / 10% random).
  c.seq_len = 128
  c.batch_size = 128  # global, over all devices and hosts
  c.mask = ml_collections.ConfigDict()
  c.mask.mask_prob = 0.15
  c.mask.max_predictions_per_seq = max_predictions_for(128)
  c.mask.mask_token_prob = 0.8
  c.mask.random_token_prob = 0.1

  # Data: see script_jax/data/ (preparation.py writes the folder, pipeline.py reads it).
  c.data = ml_collections.ConfigDict()
  c.data.source = ""  # "" = the embedded default corpus; else text files/folders or "tfds:NAME"
  c.data.prepared_dir = ""  # "" = WORKDIR/data
  # "sentencepiece" (unigram, trained on the corpus), "sentencepiece_bpe", or "wordpiece"
  c.data.tokenizer = "sentencepiece"
  c.data.vocab_file = ""  # a vocab.txt (wordpiece) or a .model (sentencepiece) to use as is
  c.data.num_shards = 8
  c.data.shuffle_buffer = 10_000
  # "windows": files read whole in a per-epoch order, shuffled within windows of shuffle_buffer
  # records (resume seeks: constant time); "buffer" (the earlier default): files
  # interleaved through a shuffle buffer of shuffle_buffer records (resume reads up to an epoch
  # to get back to its place).
  c.data.order = "windows"
  c.data.short_seq_prob = 0.1
  c.data.invalid_utf8 = "skip"  # "skip" (and count) or "error"
  # Share of whole documents set aside as the evaluation split (at least one document when > 0;
  # 0: none). Part of the preparation's recipe: a prepared folder keeps the split it was made
  # with.
  c.data.eval_fraction = 0.01

  # Optimiser (Table 4): AdamW, linear warmup then linear decay to zero, clip at 1.0.
  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 5e-4
  c.optim.warmup_steps = 10_000
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-6
  c.optim.weight_decay = 0.01
  c.optim.grad_clip_norm = 1.0
  # "optax": optax.adamw (bias-corrected) and a decay that starts after the warmup; "electra":
  # BERT's and ELECTRA's AdamWeightDecayOptimizer (no bias correction) and schedule
  # lr * (1 - t/T) * min(1, t/W) (state.py). tiny and mini were measured with "optax".
  c.optim.recipe = "optax"
  # After a step whose loss, gradient or updated state is NaN or Inf: "stop" (the paper's runs;
  # the last good checkpoint stays) or "skip" the update (the state stays as it was, the batch is
  # spent) and stop only after `max_consecutive_skips` such steps in a row, as long runs do to
  # ride out a rare loss spike.
  c.optim.on_nonfinite = "stop"
  c.optim.max_consecutive_skips = 10
  c.num_train_steps = 1_000_000

  # Mesh: data-parallel over all devices by default.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all devices not used by the model axis
  c.mesh.model = 1  # only 1: no parameter is sharded over a model axis (validate_config)
  # True: parameters and optimizer state split over 'data' (FSDP, sharding.state_shardings);
  # False: replicated on every device.
  c.mesh.fsdp = False
  # With fsdp: how many groups of devices each hold a whole copy of the split state (a
  # 'replica' mesh axis; the batch is split over both). 0: one per slice, so FSDP's gathers
  # stay on a slice's interconnect and only the gradient all-reduce crosses DCN.
  c.mesh.fsdp_replicas = 0

  # Start from another pretraining workdir's parameters when this workdir has no checkpoint.
  c.init_from = ""

  # Checkpoints and logging.
  c.checkpoint_every_steps = 5_000
  c.keep_checkpoints = 3
  c.log_every_steps = 100
  # WORKDIR/metrics/ gets a new file of the records queued since the last one this often (and
  # at every checkpoint and the end): metrics_records.py.
  c.metrics_flush_seconds = 300.0
  # Besides the last keep_checkpoints, keep every checkpoint at a multiple of this many steps
  # (for curves: fine-tune each, script_jax/experiments/); 0 keeps only the last ones. A
  # multiple of checkpoint_every_steps.
  c.keep_checkpoint_every_steps = 0

  # Held-out evaluation (evaluation.py) on the prepared data's evaluation split
  # (data.eval_fraction): every eval_every_steps and at the end (0: never).
  c.eval_every_steps = 5_000
  c.eval = ml_collections.ConfigDict()
  c.eval.max_sequences = 2_048  # the first this many held-out sequences: a cheap, fixed set
  c.eval.seed = 1234  # its masks and samples: the same at every evaluation, in every run
  return c


# configs/finetune.py:PRESET -> (learning rate, layer-wise decay, weight decay). "small" and
# "base" are the SCRIPT paper's Table 5; "electra_code" is ELECTRA's configure_finetuning.py
# default for small and base models, "large" its setting for large models.
FINETUNE_PRESETS = {"small": (3e-4, 0.8, 0.0), "base": (1e-4, 0.8, 0.0),
                    "electra_code": (1e-4, 0.8, 0.01), "large": (5e-5, 0.9, 0.01)}


# Keys added to base_config after runs were recorded, and the value a run_config.json written
# before each ran with: not always today's default (data.order was "buffer" until 2026-12-06).
KEYS_ADDED_SINCE = {
    "data.order": "buffer",
    "data.prepared_dir": "",
    "script.logsumexp_impl": "plain",
    "model.attention_impl": "xla",
    "mlm_head_impl": "xla",
    "optim.recipe": "optax",
    "mesh.fsdp": False,
    "mesh.fsdp_replicas": 0,
    "keep_checkpoint_every_steps": 0,
    "init_from": "",
    "optim.on_nonfinite": "stop",
    "optim.max_consecutive_skips": 10,
}


def upgrade_run_config(recorded: dict) -> dict:
  """A recorded run config (WORKDIR/run_config.json) with each key of KEYS_ADDED_SINCE it
  predates set to the value that run used, so readers take `config.data.order` as it is."""
  upgraded = copy.deepcopy(recorded)
  for dotted, value in KEYS_ADDED_SINCE.items():
    *sections, name = dotted.split(".")
    node = upgraded
    for section in sections:
      node = node.setdefault(section, {})
    node.setdefault(name, value)
  return upgraded


def finetune_config(size: str = "small") -> ml_collections.ConfigDict:
  """Defaults of fine-tuning: ELECTRA's recipe, the SCRIPT paper's Table 5 (configs/finetune.py).

  `size` picks a preset of FINETUNE_PRESETS: Table 5's 3e-4 for "small" (and smaller) models or
  1e-4 for "base"; ELECTRA's code defaults "electra_code" (1e-4, weight decay 0.01) or "large"
  (5e-5, layer-wise decay 0.9, weight decay 0.01).
  """
  if size not in FINETUNE_PRESETS:
    raise ConfigError(f"finetune preset {size!r}: use one of {', '.join(FINETUNE_PRESETS)}.")
  learning_rate, layerwise_lr_decay, weight_decay = FINETUNE_PRESETS[size]
  c = ml_collections.ConfigDict()
  c.learning_rate = learning_rate
  c.layerwise_lr_decay = layerwise_lr_decay
  # ELECTRA's code gives the top layer 0.8^2 (a kept quirk, finetune/optim.py); False: 0.8^1.
  c.top_layer_at_decay_2 = True
  c.b1 = 0.9
  c.b2 = 0.999
  c.eps = 1e-6
  c.adam_bias_correction = False  # ELECTRA's AdamWeightDecayOptimizer has none
  c.weight_decay = weight_decay  # Table 5: 0 (ELECTRA's code: 0.01); never on LayerNorm, biases
  c.grad_clip_norm = 1.0
  c.warmup_fraction = 0.1
  c.batch_size = 32
  c.epochs = 0  # 0: the task's own (3; 10 for RTE and STS-B; 2 for SQuAD)
  c.dropout_rate = 0.1
  c.attention_dropout_rate = 0.1
  c.max_length = 128
  # ELECTRA sums the task loss over the batch (it only interacts with the clip and eps).
  c.loss_reduction = "sum"
  c.swap_pairs = True  # MRPC and STS-B also trained with the two sentences swapped
  # > 0: train on a fixed random subset of this many training examples (before the swaps), the
  # same for every seed: for development runs on small machines, never for reported numbers.
  c.max_train_examples = 0
  c.num_seeds = 8  # the paper's mean of 8 (ELECTRA: median of 10)
  c.first_seed = 0
  c.eval_batch_size = 128
  c.log_every_steps = 50
  c.save_model = False  # write each run's final parameters (for `predict`)

  c.squad = ml_collections.ConfigDict()
  c.squad.max_length = 512  # ELECTRA's; 128 or 256 for models pretrained on short sequences
  c.squad.doc_stride = 128
  c.squad.max_query_length = 64
  c.squad.n_best = 20
  c.squad.max_answer_length = 30
  c.squad.epochs = 2
  c.squad.no_answer_weight = 0.5  # the no-answer classifier's loss weight (SQuAD 2.0)
  # "electra": ELECTRA's head (end conditioned on the start, a beam of n_best starts in
  # prediction, the answerable classifier on [CLS] and the start-weighted state); "bert":
  # independent start and end logits and a no-answer logit from [CLS].
  c.squad.head = "electra"
  c.squad.eval_batch_size = 32  # the beam holds [batch, n_best, length, 512] activations
  # SQuAD 2.0: answer "" when P(no answer) > this, in the scores and in predictions.json. -1:
  # the head's own, ELECTRA's cut sigmoid(-2.75) = 0.0601 for "electra", BERT's 0.5 (null score
  # above the best span's) for "bert". results.json also has the best threshold's scores.
  c.squad.na_prob_thresh = -1.0
  return c


# ----------------------------------------------------------------------------- checks
# Each rule has one home here; a `*_problem` function returns the message (None when fine), so
# the trainer, the data pipeline and the scorers raise their own error type with the same words.


def max_predictions_problem(config: ml_collections.ConfigDict) -> Optional[str]:
  """mask.max_predictions_per_seq must be in [1, seq_len]."""
  p = config.mask.max_predictions_per_seq
  if 1 <= p <= config.seq_len:
    return None
  return f"mask.max_predictions_per_seq {p} must be in [1, seq_len={config.seq_len}]"


def batch_per_host_problem(batch_size: int, process_count: int) -> Optional[str]:
  """The global batch is split evenly over the host processes."""
  if batch_size % process_count == 0:
    return None
  return (f"config.batch_size={batch_size} does not divide evenly over {process_count} "
          f"processes (hosts); use a multiple of {process_count}.")


def vocab_size_problem(tokenizer_vocab_size: int, config: ml_collections.ConfigDict,
                       tokenizer_path: str) -> Optional[str]:
  """The model's vocabulary must be the tokenizer's."""
  if tokenizer_vocab_size == config.model.vocab_size:
    return None
  return (f"The tokenizer {tokenizer_path} has {tokenizer_vocab_size} entries but "
          f"config.model.vocab_size={config.model.vocab_size}; set "
          f"--config.model.vocab_size={tokenizer_vocab_size}.")


def validate_config(config, num_devices: int | None = None, process_count: int | None = None,
                    num_slices: int | None = None):
  """Raises ConfigError with a clear message for every inconsistency we can see up front."""
  import jax  # pylint: disable=g-import-not-at-top  (jax config: main.py sets LIBTPU_INIT_ARGS after importing this)
  from script_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top  (jax config: main.py sets LIBTPU_INIT_ARGS after importing this)
  num_devices = jax.device_count() if num_devices is None else num_devices
  process_count = jax.process_count() if process_count is None else process_count
  num_slices = sharding_lib.num_slices(jax.devices()) if num_slices is None else num_slices
  m = config.model
  problems = []
  # Counts and intervals a run divides or loops by: 0 or less is never meant.
  for key in ("num_train_steps", "batch_size", "checkpoint_every_steps", "log_every_steps",
              "keep_checkpoints"):
    if config[key] < 1:
      problems.append(f"{key}={config[key]} must be 1 or more" + (
          " (it is how many of the latest checkpoints are kept; 0 would delete them all)"
          if key == "keep_checkpoints" else ""))
  if config.objective not in OBJECTIVES:
    problems.append(f"unknown objective {config.objective!r}; choose one of "
                    f"{', '.join(OBJECTIVES)}")
  if m.hidden_size % m.num_heads:
    problems.append(f"model.hidden_size {m.hidden_size} is not divisible by model.num_heads "
                    f"{m.num_heads}")
  if config.objective == "electra" and (
      config.electra.generator_hidden_size % config.electra.generator_num_heads):
    problems.append("electra.generator_hidden_size is not divisible by generator_num_heads")
  if config.seq_len > m.max_position_embeddings:
    problems.append(f"seq_len {config.seq_len} exceeds model.max_position_embeddings "
                    f"{m.max_position_embeddings}")
  problems.append(max_predictions_problem(config))
  if m.dtype not in DTYPES:
    problems.append(f"model.dtype must be one of {', '.join(DTYPES)}, got {m.dtype!r}")
  if config.script.disc_positions not in DISC_POSITIONS:
    problems.append(f"script.disc_positions must be one of {', '.join(DISC_POSITIONS)}, got "
                    f"{config.script.disc_positions!r}")
  if config.script.logsumexp_impl not in LOGSUMEXP_IMPLS:
    problems.append(f"script.logsumexp_impl must be one of {', '.join(LOGSUMEXP_IMPLS)}, got "
                    f"{config.script.logsumexp_impl!r}")
  if m.attention_impl not in ATTENTION_IMPLS:
    problems.append(f"model.attention_impl must be one of {', '.join(ATTENTION_IMPLS)}, got "
                    f"{m.attention_impl!r}")
  if config.rng_impl not in RNG_IMPLS:
    problems.append(f"rng_impl must be one of {', '.join(RNG_IMPLS)}, got {config.rng_impl!r}")
  if config.data.order not in DATA_ORDERS:
    problems.append(f"data.order must be one of {', '.join(DATA_ORDERS)}, got "
                    f"{config.data.order!r}")
  if config.sampler not in SAMPLERS:
    problems.append(f"sampler must be one of {', '.join(SAMPLERS)}, got "
                    f"{config.sampler!r}")
  if config.mlm_head_impl not in MLM_HEAD_IMPLS:
    problems.append(f"mlm_head_impl must be one of {', '.join(MLM_HEAD_IMPLS)}, got "
                    f"{config.mlm_head_impl!r}")
  elif config.mlm_head_impl == "pallas" and config.sampler != "gumbel":
    problems.append(f"mlm_head_impl=pallas draws by Gumbel-max only: set sampler=gumbel (got "
                    f"{config.sampler!r}) or mlm_head_impl=xla")
  if config.optim.recipe not in OPTIMIZER_RECIPES:
    problems.append(f"optim.recipe must be one of {', '.join(OPTIMIZER_RECIPES)}, got "
                    f"{config.optim.recipe!r}")
  if config.optim.on_nonfinite not in NONFINITE_POLICIES:
    problems.append(f"optim.on_nonfinite must be one of {', '.join(NONFINITE_POLICIES)}, got "
                    f"{config.optim.on_nonfinite!r}")
  if config.optim.max_consecutive_skips < 1:
    problems.append(f"optim.max_consecutive_skips={config.optim.max_consecutive_skips} must be "
                    "1 or more")
  if config.optim.warmup_steps < 0:
    problems.append(f"optim.warmup_steps={config.optim.warmup_steps} must be 0 or more")
  elif config.num_train_steps >= 1 and config.optim.warmup_steps > config.num_train_steps:
    problems.append(f"optim.warmup_steps {config.optim.warmup_steps} exceeds num_train_steps "
                    f"{config.num_train_steps}")
  requested_replicas = config.mesh.fsdp_replicas
  replicas, data_axis, model_axis = sharding_lib.mesh_shape(config, num_devices, num_slices)
  if requested_replicas < 0 or (requested_replicas and not config.mesh.fsdp):
    problems.append(f"mesh.fsdp_replicas={requested_replicas}: it is 0 (one per slice) or the "
                    "number of groups that each hold a copy of the state, and applies only "
                    "with mesh.fsdp=True")
  elif model_axis < 1 or replicas * data_axis * model_axis != num_devices:
    shown = f"fsdp_replicas={replicas} x " if replicas > 1 else ""
    problems.append(f"mesh {shown}data={config.mesh.data} x model={config.mesh.model} does not "
                    f"cover the {num_devices} devices")
  elif replicas > 1 and num_slices > 1 and replicas % num_slices:
    problems.append(f"mesh.fsdp_replicas={replicas} must be a multiple of the {num_slices} "
                    "slices: a group of devices that holds a copy of the state lies within one "
                    "slice")
  elif config.batch_size >= 1 and config.batch_size % (replicas * data_axis):
    problems.append(f"batch_size {config.batch_size} is not divisible by the "
                    f"{replicas * data_axis} data-parallel devices; choose a multiple "
                    "(--config.batch_size=...)")
  if model_axis > 1:
    # Nothing is sharded over a model axis yet: it would only run the same work twice.
    problems.append(f"mesh.model={model_axis}: model parallelism is not implemented (no "
                    "parameter is sharded over a model axis), so a model axis would only "
                    "duplicate work; use mesh.model=1 (the default: data parallel over all "
                    "devices)")
  problems.append(batch_per_host_problem(config.batch_size, process_count))
  if config.eval_every_steps < 0 or config.eval.max_sequences < 1:
    problems.append(f"eval_every_steps ({config.eval_every_steps}) must be 0 (no evaluation) "
                    f"or more, eval.max_sequences ({config.eval.max_sequences}) 1 or more")
  if not config.metrics_flush_seconds > 0:
    problems.append(f"metrics_flush_seconds ({config.metrics_flush_seconds}) must be more "
                    "than 0")
  keep_every = config.keep_checkpoint_every_steps
  if keep_every < 0 or (keep_every and config.checkpoint_every_steps >= 1 and
                        keep_every % config.checkpoint_every_steps):
    problems.append(f"keep_checkpoint_every_steps {keep_every} must be 0 or a multiple of "
                    f"checkpoint_every_steps {config.checkpoint_every_steps} (only saved "
                    "checkpoints can be kept)")
  problems = [p for p in problems if p]
  if problems:
    raise ConfigError("Invalid config:\n  - " + "\n  - ".join(problems))


def validate_finetune_config(ft: ml_collections.ConfigDict, squad: bool = False,
                             num_devices: int | None = None) -> None:
  """Raises ConfigError listing every mistake in a fine-tuning config, before any work.

  `squad`: also the squad.* keys. The lengths against the model's positions are checked once
  the pretrained model is read (finetune.glue / finetune.squad).
  """
  import jax  # pylint: disable=g-import-not-at-top  (jax config: main.py sets LIBTPU_INIT_ARGS after importing this)
  num_devices = jax.device_count() if num_devices is None else num_devices
  problems = []

  def at_least(key, value, low):
    if value < low:
      problems.append(f"{key}={value} must be at least {low}")

  at_least("batch_size", ft.batch_size, 1)
  if ft.batch_size >= 1 and ft.batch_size % num_devices:
    problems.append(f"batch_size={ft.batch_size} is not divisible by the {num_devices} "
                    "devices; use a multiple")
  for key, low in (("eval_batch_size", 1), ("epochs", 0), ("num_seeds", 1), ("first_seed", 0),
                   ("max_train_examples", 0), ("log_every_steps", 1), ("max_length", 8)):
    at_least(key, ft[key], low)
  if not ft.learning_rate > 0:
    problems.append(f"learning_rate={ft.learning_rate} must be above 0")
  if not 0 < ft.layerwise_lr_decay <= 1:
    problems.append(f"layerwise_lr_decay={ft.layerwise_lr_decay} must be in (0, 1]")
  if not 0 <= ft.warmup_fraction <= 1:
    problems.append(f"warmup_fraction={ft.warmup_fraction} must be in [0, 1]")
  for key in ("dropout_rate", "attention_dropout_rate"):
    if not 0 <= ft[key] < 1:
      problems.append(f"{key}={ft[key]} must be in [0, 1)")
  if ft.loss_reduction not in ("sum", "mean"):
    problems.append(f"loss_reduction={ft.loss_reduction!r}; use 'sum' or 'mean'")
  if squad:
    sq = ft.squad
    if sq.head not in SQUAD_HEADS:
      problems.append(f"squad.head={sq.head!r}; use one of {', '.join(SQUAD_HEADS)}")
    for key, low in (("max_query_length", 1), ("doc_stride", 1), ("n_best", 1),
                     ("max_answer_length", 1), ("epochs", 1), ("eval_batch_size", 1)):
      at_least("squad." + key, sq[key], low)
    # [CLS] question [SEP] context [SEP]: the longest question must leave context room.
    if sq.max_length - sq.max_query_length - 3 < 1:
      problems.append(f"squad.max_length={sq.max_length} leaves no room for context after a "
                      f"question of squad.max_query_length={sq.max_query_length} tokens and "
                      "3 special tokens; raise max_length or lower max_query_length")
    if not (0 <= sq.na_prob_thresh <= 1 or sq.na_prob_thresh == -1):
      problems.append(f"squad.na_prob_thresh={sq.na_prob_thresh} must be in [0, 1] (or -1: "
                      "the head's own threshold)")
    if sq.no_answer_weight < 0:
      problems.append(f"squad.no_answer_weight={sq.no_answer_weight} must be 0 or more")
  if problems:
    raise ConfigError("Invalid fine-tuning config:\n  - " + "\n  - ".join(problems))
