"""Fine-tuning recipe: ELECTRA's, the SCRIPT paper's Table 5 (config_lib.finetune_config).

  python -m script_jax.finetune.glue --config=configs/finetune.py --init_from=WORKDIR \
      --data_dir=GLUE_DIR --output_dir=OUT
  python -m script_jax.finetune.glue --config=configs/finetune.py:base ...   # lr 1e-4

The argument after ':' picks Table 5's learning rate: small (3e-4, the default) or base (1e-4).
Every key can be overridden: --config.num_seeds=3 --config.layerwise_lr_decay=0.9 ...
"""

from script_jax import config_lib


def get_config(arg=None):
  return config_lib.finetune_config(arg or "small")
