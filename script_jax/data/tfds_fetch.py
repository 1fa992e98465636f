"""TFDS datasets fetched with one clear error when the download fails.

TFDS retries an unreachable host ten times with back-off (about three and a half minutes) and
then raises the HTTP library's ConnectionError with a traceback; on a machine without network
that is the usual first contact. Every TFDS source of the project (pretraining corpora, GLUE,
SQuAD) goes through `prepare`, which turns a failed download into a UserError saying where the
data was going and what to do instead.
"""

from __future__ import annotations

from typing import Optional

from script_jax import cli_errors


class TfdsFetchError(cli_errors.UserError):
  """A TFDS dataset that is neither prepared in the data folder nor downloadable."""


def builder(name: str, data_dir: Optional[str] = None):
  """TFDS's builder for `name` (e.g. "glue/rte"); an unknown name is a TfdsFetchError."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (heavy: tensorflow_datasets)
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise TfdsFetchError(f"TFDS has no dataset {name!r}: {e}".splitlines()[0]) from e


def prepare(dataset_builder, name: str, instead: str, download_config=None) -> None:
  """Downloads and prepares the dataset unless its data folder already holds it.

  Args:
    dataset_builder: from `builder`.
    name: the dataset's name, for the message.
    instead: what the user can do without network (e.g. "Use --data_dir with the GLUE files.").
    download_config: passed to TFDS (a manual_dir, for instance).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (heavy: tensorflow_datasets)
  try:
    dataset_builder.download_and_prepare(download_config=download_config)
  except (OSError, tfds.download.DownloadError) as e:  # requests' ConnectionError is an OSError
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise TfdsFetchError(
        f"TFDS could not download or prepare {name} into {dataset_builder.data_dir} "
        f"({type(e).__name__}: {reason}). Without network, prepare it on a machine that has "
        f"one and copy the TFDS folder to $TFDS_DATA_DIR (local or gs://). {instead}") from e


def load(name: str, split: str, *, data_dir: Optional[str], instead: str):
  """The split as a tf.data.Dataset of feature dicts, in file order, downloading on first use."""
  dataset_builder = builder(name, data_dir)
  prepare(dataset_builder, name, instead)
  return dataset_builder.as_dataset(split=split, shuffle_files=False)
