"""Serve fixture records through the real `tfds.load` with no download, for the TFDS paths of
the fine-tuning commands (GLUE `glue/*`, SQuAD `squad/*`).

TFDS's own testing hook (`tfds.testing.mock_data(as_dataset_fn=...)`) replaces only the
builder's reading of prepared files: the builder (names, configs, split names, feature specs)
and `tfds.load`/`tfds.as_numpy` are TFDS's. A record that does not fit the dataset's real
feature spec fails here, as it would from TFDS.

In a test:   with serve({"squad/v1.1": {"train": [...], "validation": [...]}}): ...
A command:   python tests/tfds_fixture.py FIXTURE.json MODULE [ARGS...]
             (FIXTURE.json holds the same mapping; MODULE is run as `python -m MODULE ARGS`).
"""

import contextlib
import json
import runpy
import sys


@contextlib.contextmanager
def serve(records_by_dataset):
  """Within the block, tfds.load(NAME, split=SPLIT) yields records_by_dataset[NAME][SPLIT]."""
  import tensorflow as tf
  import tensorflow_datasets as tfds

  def as_dataset(builder, split, *args, **kwargs):
    del args, kwargs
    name = f"{builder.name}/{builder.builder_config.name}"
    records = records_by_dataset[name][str(split)]
    spec = builder.info.features.get_tensor_spec()
    return tf.data.Dataset.from_generator(lambda: iter(records), output_signature=spec)

  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    yield


def main(argv):
  fixture_file, module, *args = argv[1:]
  with open(fixture_file, encoding="utf-8") as f:
    records_by_dataset = json.load(f)
  sys.argv = [module, *args]
  with serve(records_by_dataset):
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
  main(sys.argv)
