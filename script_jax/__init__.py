"""script_jax: SCRIPT (Self-CRItic Pretraining of Transformers) in JAX/Flax."""

__version__ = "0.1.0"
