"""The data stage: corpus sources, tokenizers, packing, preparation, the tf.data pipeline."""
