"""The one place where every config key is defined, with its default.

Config files in configs/ start from `base_config()` and write out the paper's numbers (Table 4).
Every key here can be overridden from the command line, e.g. `--config.objective=electra`.
"""

import os

import ml_collections

OBJECTIVES = ("script", "electra", "mlm")
# ELECTRA's (and BERT's) uncased WordPiece vocab, shipped with the package (Apache-2.0).
BERT_UNCASED_VOCAB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets",
                                  "bert_uncased_vocab.txt")


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
  # PRNG behind each step's dropout masks and samples (init always uses threefry2x32, so the
  # initial parameters do not depend on it). "rbg" draws bits with XLA's RngBitGenerator
  # (commonly cheaper than threefry on TPUs; no measurable change on an H200, see
  # docs/benchmarks.md); its streams may differ across platforms, jax versions and
  # device counts (the distributions do not).
  c.rng_impl = "threefry2x32"

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
  # GPU kernels, not yet timed on one).
  c.model.fused_qkv = False
  c.model.logsumexp_chunk = 0  # >0: the critic's logsumexp over V in chunks of this many tokens

  # SCRIPT (paper Section 2): L = L_MLM + alpha * L_Disc.
  c.script = ml_collections.ConfigDict()
  c.script.alpha = 50.0
  c.script.temperature = 1.0  # tau of the Gumbel-max sample
  c.script.disc_positions = "all"  # "all" non-padding positions or "masked" positions only

  # ELECTRA baseline: generator 1/4 of the discriminator's hidden size, shared embeddings.
  c.electra = ml_collections.ConfigDict()
  c.electra.generator_hidden_size = 64
  c.electra.generator_num_heads = 1
  c.electra.generator_intermediate_size = 256
  c.electra.generator_num_layers = 12
  c.electra.disc_weight = 50.0
  c.electra.temperature = 1.0

  # Batches and masking (paper appendix: 15%, of those 80% [MASK] / 10% kept / 10% random).
  c.seq_len = 128
  c.batch_size = 128  # global, over all devices and hosts
  c.mask = ml_collections.ConfigDict()
  c.mask.mask_prob = 0.15
  c.mask.max_predictions_per_seq = max_predictions_for(128)
  c.mask.mask_token_prob = 0.8
  c.mask.random_token_prob = 0.1

  # Data: see script_jax/input_pipeline.py and prepare_data.py.
  c.data = ml_collections.ConfigDict()
  c.data.source = ""  # "" = the embedded default corpus; else text files/folders or "tfds:NAME"
  c.data.prepared_dir = ""  # "" = WORKDIR/data
  # "sentencepiece" (unigram, trained on the corpus), "sentencepiece_bpe", or "wordpiece"
  c.data.tokenizer = "sentencepiece"
  c.data.vocab_file = ""  # a vocab.txt (wordpiece) or a .model (sentencepiece) to use as is
  c.data.num_shards = 8
  c.data.shuffle_buffer = 10_000
  c.data.short_seq_prob = 0.1
  c.data.invalid_utf8 = "skip"  # "skip" (and count) or "error"

  # Optimiser (Table 4): AdamW, linear warmup then linear decay to zero, clip at 1.0.
  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 5e-4
  c.optim.warmup_steps = 10_000
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-6
  c.optim.weight_decay = 0.01
  c.optim.grad_clip_norm = 1.0
  c.num_train_steps = 1_000_000

  # Mesh: data-parallel over all devices by default.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all devices not used by the model axis
  c.mesh.model = 1

  # Start from another pretraining workdir's parameters when this workdir has no checkpoint.
  c.init_from = ""

  # Checkpoints and logging.
  c.checkpoint_every_steps = 5_000
  c.keep_checkpoints = 3
  c.log_every_steps = 100
  return c
