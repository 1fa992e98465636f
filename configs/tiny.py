"""A model and run small enough to pretrain in minutes on a 2-core CPU, on the embedded corpus.

  python -m script_jax.main --config=configs/tiny.py --workdir=/tmp/script_tiny
  python -m script_jax.main --config=configs/tiny.py --config.objective=mlm --workdir=...
"""

from script_jax import config_lib


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  c.model.vocab_size = 2048  # sentencepiece trained on the corpus
  c.model.num_layers = 2
  c.model.hidden_size = 64
  c.model.intermediate_size = 256
  c.model.num_heads = 2
  c.model.embedding_size = 32
  c.model.max_position_embeddings = 128
  c.model.dropout_rate = 0.0
  c.model.attention_dropout_rate = 0.0
  c.electra.generator_hidden_size = 16
  c.electra.generator_num_heads = 1
  c.electra.generator_intermediate_size = 64
  c.electra.generator_num_layers = 2
  c.seq_len = 64
  c.mask.max_predictions_per_seq = config_lib.max_predictions_for(c.seq_len)
  c.batch_size = 32
  c.optim.learning_rate = 2e-3
  c.optim.warmup_steps = 50
  c.num_train_steps = 600
  c.checkpoint_every_steps = 200
  c.log_every_steps = 25
  c.data.tokenizer = "sentencepiece"
  c.data.num_shards = 8
  c.data.shuffle_buffer = 2_000
  return c
