"""SCRIPT-small, the paper's Table 4 (14M parameters).

  python -m script_jax.main --config=configs/small.py --workdir=/tmp/script_small
  python -m script_jax.main --config=configs/small.py --config.objective=electra --workdir=...
"""

from script_jax import config_lib


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  c.model.vocab_size = 30522
  c.model.num_layers = 12
  c.model.hidden_size = 256
  c.model.intermediate_size = 1024
  c.model.num_heads = 4  # head size 64
  c.model.embedding_size = 128
  c.model.dropout_rate = 0.1
  c.model.attention_dropout_rate = 0.1
  c.seq_len = 128
  c.mask.max_predictions_per_seq = config_lib.max_predictions_for(c.seq_len)
  c.batch_size = 128
  c.optim.learning_rate = 5e-4
  c.optim.warmup_steps = 10_000
  c.optim.eps = 1e-6
  c.optim.b1, c.optim.b2 = 0.9, 0.999
  c.optim.weight_decay = 0.01
  # The paper pretrains "with identical pre-processing and optimization procedures" as BERT and
  # ELECTRA: their AdamWeightDecayOptimizer (no bias correction) and lr * (1 - t/T) * min(1, t/W).
  # Optax's bias correction mostly changes the first few hundred steps, inside the warmup; the
  # reference's procedure is what the paper's numbers were obtained with.
  c.optim.recipe = "electra"
  c.num_train_steps = 1_000_000
  # ELECTRA-small's generator: 1/4 of the discriminator's hidden size.
  c.electra.generator_hidden_size = 64
  c.electra.generator_num_heads = 1
  c.electra.generator_intermediate_size = 256
  c.data.tokenizer = "wordpiece"
  c.data.vocab_file = config_lib.BERT_UNCASED_VOCAB  # ELECTRA's BERT-uncased vocab, 30522 entries
  # On a TPU, --config.script.logsumexp_impl=pallas (the critic's logsumexp by fused kernels),
  # --config.model.attention_impl=pallas (each layer's attention in one kernel) and
  # --config.mlm_head_impl=pallas (the MLM head's loss, accuracy and sample by fused kernels)
  # are the fastest settings of all three objectives by the TPU compiler's estimate
  # (docs/benchmarks.md sections 7.4, 7.9 and 7.10; fewer bytes per step). They are not the
  # defaults: the kernels have been compiled for TPUs but not yet run on one, off a TPU they run
  # in Pallas's interpret mode, far slower than the plain formulas, and the attention kernel
  # and the head draw their own dropout masks and Gumbel noise (the losses and gradients equal
  # the plain formulas' without dropout and sampling, tested).
  return c
