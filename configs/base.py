"""SCRIPT-base, the paper's Table 4 (110M parameters), at ELECTRA-base's pretraining setup.

  python -m script_jax.main --config=configs/base.py --workdir=/tmp/script_base

The paper's base rows compare against ELECTRA-base, which its authors pretrained on sequences of
512 tokens (configure_pretraining.py: max_seq_length 512, mask 15% -> 79 predictions per
sequence, batch 256, lr 2e-4, 766k steps, generator 1/3 of the discriminator). Table 4 does not
give the length; 512 is what "identical settings as ELECTRA" means. Override
--config.seq_len=128 --config.mask.max_predictions_per_seq=20 for a cheaper run at small's length.

The slice: as configured (float32, layers unrolled) SCRIPT-base needs 16.27 GB of temporaries per
device, more than a v3-8 core's 15.48 (the TPU compiler's figure; ELECTRA-base fits in 11.55 GiB).
On a v3-8 add --config.model.dtype=bfloat16 --config.script.logsumexp_impl=pallas
--config.model.attention_impl=pallas --config.mlm_head_impl=pallas (the fused kernels; their
dropout masks and Gumbel noise are their own streams): 11.11 GiB per device, the compiler's
estimate 2.4 steps/s (docs/benchmarks.md section 7.10); or, without kernels,
--config.model.dtype=bfloat16 --config.model.scan_layers=True --config.model.remat=True
--config.script.logsumexp_chunk=2048: 4.62 GiB (section 7.2). Check a slice before paying for
it:

  python -m script_jax.bench.tpu_compile --config=configs/base.py --topology=v3-8
"""

from script_jax import config_lib


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  c.model.vocab_size = 30522
  c.model.num_layers = 12
  c.model.hidden_size = 768
  c.model.intermediate_size = 3072
  c.model.num_heads = 12  # head size 64
  c.model.embedding_size = 768
  c.model.dropout_rate = 0.1
  c.model.attention_dropout_rate = 0.1
  c.seq_len = 512  # ELECTRA-base's max_seq_length
  c.mask.max_predictions_per_seq = config_lib.max_predictions_for(c.seq_len)
  c.batch_size = 256
  c.optim.learning_rate = 2e-4
  c.optim.warmup_steps = 10_000
  c.optim.eps = 1e-6
  c.optim.b1, c.optim.b2 = 0.9, 0.999
  c.optim.weight_decay = 0.01
  # The paper pretrains "with identical pre-processing and optimization procedures" as BERT and
  # ELECTRA: their AdamWeightDecayOptimizer (no bias correction) and lr * (1 - t/T) * min(1, t/W).
  # Optax's bias correction mostly changes the first few hundred steps, inside the warmup; the
  # reference's procedure is what the paper's numbers were obtained with.
  c.optim.recipe = "electra"
  c.num_train_steps = 766_000
  # ELECTRA-base's generator is 1/3 of the discriminator (Clark et al., 2020).
  c.electra.generator_hidden_size = 256
  c.electra.generator_num_heads = 4
  c.electra.generator_intermediate_size = 1024
  c.data.tokenizer = "wordpiece"
  c.data.vocab_file = config_lib.BERT_UNCASED_VOCAB
  return c
