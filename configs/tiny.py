"""A model and run small enough to pretrain in minutes on a 2-core CPU, on the embedded corpus.

  python -m script_jax.main --config=configs/tiny.py --workdir=/tmp/script_tiny
  python -m script_jax.main --config=configs/tiny.py --config.objective=mlm --workdir=...
"""

from script_jax import config_lib


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  c.model.vocab_size = 512  # sentencepiece trained on the corpus (65k words: keep it small)
  c.model.num_layers = 2
  c.model.hidden_size = 64
  c.model.intermediate_size = 256
  c.model.num_heads = 2
  c.model.embedding_size = 64
  # BERT's 0.02 leaves a model this narrow with vanishing attention gradients (q.k ~ 1e-3 at
  # init) and a long plateau at the unigram loss; 0.1 lets it learn in minutes.
  c.model.initializer_range = 0.1
  c.model.max_position_embeddings = 128
  c.model.dropout_rate = 0.0
  c.model.attention_dropout_rate = 0.0
  c.electra.generator_hidden_size = 16
  c.electra.generator_num_heads = 1
  c.electra.generator_intermediate_size = 64
  c.electra.generator_num_layers = 2
  # τ = 2 for both objectives (the paper's default is 1). A model this weak samples tokens it
  # finds plausible itself; at τ = 1 neither its own critic nor ELECTRA's discriminator gets
  # confident that any token is replaced within minutes (accuracy = the share of original
  # tokens, measured over 1,500-4,000 steps). Flatter samples are easier to catch, and the
  # critic's accuracy visibly rises above that share. small/base keep τ = 1.
  c.script.temperature = 2.0
  c.electra.temperature = 2.0
  # alpha = 5 (paper: 50). At 50 a model this small spends itself on the critic and learns
  # context slowly: after 3,000 steps at tau = 2, mlm_loss 4.61 against 3.43 at alpha = 5, and
  # its critic PLL prefers a real sentence to its shuffled words in 47.5% against 78.5% of 200
  # pairs (docs/scoring.md). ELECTRA's discriminator weight follows, for identical settings.
  c.disc_weight = 5.0  # alpha, and ELECTRA's lambda
  c.seq_len = 64
  c.mask.max_predictions_per_seq = config_lib.max_predictions_for(c.seq_len)
  c.batch_size = 32
  c.optim.learning_rate = 3e-3
  c.optim.warmup_steps = 100
  c.num_train_steps = 3000
  c.checkpoint_every_steps = 1000
  c.log_every_steps = 50
  c.data.tokenizer = "sentencepiece"
  c.data.num_shards = 8
  c.data.shuffle_buffer = 2_000
  # 4 of the corpus's 79 documents held out (1% would be one document: a noisy curve).
  c.data.eval_fraction = 0.05
  c.eval_every_steps = 500
  return c
