"""script_jax: SCRIPT (Self-CRItic Pretraining of Transformers) in JAX/Flax."""

__version__ = "0.1.0"

from script_jax import fs as _fs  # pylint: disable=g-import-not-at-top

_fs.bound_remote_waits()  # before any of the package's modules imports TensorFlow
