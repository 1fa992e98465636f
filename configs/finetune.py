"""Fine-tuning recipe: ELECTRA's, the SCRIPT paper's Table 5 (config_lib.finetune_config).

  python -m script_jax.finetune.glue --config=configs/finetune.py --init_from=WORKDIR \
      --data_dir=GLUE_DIR --output_dir=OUT
  python -m script_jax.finetune.glue --config=configs/finetune.py:base ...   # lr 1e-4

The argument after ':' picks a preset: Table 5's small (lr 3e-4, the default) or base (1e-4);
electra_code (ELECTRA's configure_finetuning.py defaults for small and base models: lr 1e-4,
weight decay 0.01) or large (ELECTRA's large models: lr 5e-5, layer-wise decay 0.9, weight
decay 0.01):

  python -m script_jax.finetune.glue --config=configs/finetune.py:electra_code ...

Every key can be overridden: --config.num_seeds=3 --config.layerwise_lr_decay=0.9 ...
"""

from script_jax import config_lib


def get_config(arg=None):
  return config_lib.finetune_config(arg or "small")
