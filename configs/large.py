"""SCRIPT at ELECTRA-large's sizes and pretraining setup (335M parameters), with FSDP.

  python -m script_jax.main --config=configs/large.py --workdir=gs://BUCKET/script_large

ELECTRA-large (Clark et al., 2020; configure_pretraining.py's "large"): 24 layers, hidden 1024,
16 heads, FFN 4096, embeddings 1024, sequences of 512 tokens, batch 2048, lr 2e-4 with 10,000
warmup steps, 400k steps (its ELECTRA-400K row; 1.75M for ELECTRA-1.75M), a generator a quarter
of the discriminator's width. The SCRIPT paper reports small and base only: this config carries
its method to the next size under ELECTRA's settings.

At this size a replica of the state on every device (parameters plus Adam's two moments, 4 GB
in float32) is what FSDP removes: mesh.fsdp splits parameters and optimizer state over the data
axis (sharding.state_shardings), and the step gathers one layer's weights at a time inside the
scan (sharding.LayerGather). Layers are scanned and rematerialised, which keeps compilation short
and activations to one layer's. Per-device memory, replicated against FSDP, from a
compile-only benchmark: docs/benchmarks.md.

On a v5litepod-256 split the state within groups of 16 devices, not over all 256:

  python -m script_jax.main --config=configs/large.py --config.mesh.fsdp_replicas=16 ...

Over 256 devices each device would hold 4 of the 1024 rows of a weight, and the TPU compiler
then writes FSDP's gathers and reduce-scatters as all-reduces of whole arrays; in groups of 16
(64 rows each) they are gathers and reduce-scatters, with fewer bytes per step and about 3 GiB
per device (docs/benchmarks.md 7.3, the TPU compiler's figures).
"""

from script_jax import config_lib


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  c.model.vocab_size = 30522
  c.model.num_layers = 24
  c.model.hidden_size = 1024
  c.model.intermediate_size = 4096
  c.model.num_heads = 16  # head size 64
  c.model.embedding_size = 1024
  c.model.dropout_rate = 0.1
  c.model.attention_dropout_rate = 0.1
  c.model.scan_layers = True
  c.model.remat = True
  c.seq_len = 512
  c.mask.max_predictions_per_seq = config_lib.max_predictions_for(c.seq_len)
  c.batch_size = 2048
  c.optim.learning_rate = 2e-4
  c.optim.warmup_steps = 10_000
  c.optim.eps = 1e-6
  c.optim.b1, c.optim.b2 = 0.9, 0.999
  c.optim.weight_decay = 0.01
  c.optim.recipe = "electra"  # as configs/base.py: BERT's and ELECTRA's optimizer and schedule
  c.num_train_steps = 400_000
  # ELECTRA-large's generator: a quarter of the discriminator's width, its depth.
  c.electra.generator_hidden_size = 256
  c.electra.generator_num_heads = 4
  c.electra.generator_intermediate_size = 1024
  c.mesh.fsdp = True
  c.data.tokenizer = "wordpiece"
  c.data.vocab_file = config_lib.BERT_UNCASED_VOCAB
  return c
