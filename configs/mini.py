"""Between tiny and small: the largest model this project's 2-core CPU pretrains in about an hour
on real English (the Wikipedia sample), for development runs of the fine-tuning tables.

  python -m script_jax.main --config=configs/mini.py --workdir=/tmp/script_mini \
      --config.data.source=PATH/enwiki_AA_docs.txt.gz

4 layers, hidden 128, embeddings 128, 2 heads of 64, FFN 512, a sentencepiece vocabulary of
4,096 pieces trained on the corpus, sequences of 128 tokens (the fine-tuning length), batch 32.
1.36 M parameters. Its measured losses, held-out metrics and GLUE scores, against the same model
from random initialisation, are in docs/finetune.md.
"""

from script_jax import config_lib


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  c.model.vocab_size = 4096  # sentencepiece trained on the corpus
  c.model.num_layers = 4
  c.model.hidden_size = 128
  c.model.embedding_size = 128
  c.model.intermediate_size = 512
  c.model.num_heads = 2  # head size 64, as small and base
  c.model.max_position_embeddings = 128
  # BERT's 0.02 left this narrow model on the unigram plateau: 1,800 steps at 0.02 reached an
  # mlm_loss of only 6.07 (ln 4096 = 8.32) with the critic no better than "always original"
  # (disc_accuracy 0.854 = the share of original tokens). tiny.py found the same and says why.
  c.model.initializer_range = 0.1
  c.model.dropout_rate = 0.1
  c.model.attention_dropout_rate = 0.1
  c.electra.generator_hidden_size = 32
  c.electra.generator_num_heads = 1
  c.electra.generator_intermediate_size = 128
  c.electra.generator_num_layers = 4
  # The tiny config's measured settings for a weak model (configs/tiny.py says why): tau 2 makes
  # the samples easier to catch, alpha 5 leaves the MLM loss room to fall in few steps.
  c.script.temperature = 2.0
  c.electra.temperature = 2.0
  c.disc_weight = 5.0  # alpha, and ELECTRA's lambda
  c.seq_len = 128
  c.mask.max_predictions_per_seq = config_lib.max_predictions_for(c.seq_len)
  c.batch_size = 32
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 100
  c.num_train_steps = 3000
  c.checkpoint_every_steps = 250
  c.log_every_steps = 100
  # Held-out metrics six times over the run (about 40 s each here), and a checkpoint kept every
  # 1,000 steps for the sample-efficiency curve.
  c.eval_every_steps = 500
  c.keep_checkpoint_every_steps = 1000
  c.data.tokenizer = "sentencepiece"
  c.data.num_shards = 8
  return c
