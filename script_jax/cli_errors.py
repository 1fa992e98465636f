"""Turns the errors a user can fix into one clear message and exit status 2, not a traceback."""

import contextlib
import sys

from absl import logging


def user_error_types() -> tuple[type[BaseException], ...]:
  """The exception classes whose message is the whole story for the user."""
  from script_jax import checkpoints, train  # pylint: disable=g-import-not-at-top
  types = [train.ConfigError, train.NonFiniteLossError, checkpoints.CheckpointMismatchError,
           FileNotFoundError]
  try:
    from script_jax import corpus  # pylint: disable=g-import-not-at-top
    types.append(corpus.DataError)
  except (ImportError, AttributeError):
    pass
  return tuple(types)


@contextlib.contextmanager
def friendly_errors():
  """Prints `error: <message>` and exits with status 2 for the errors a user can fix."""
  try:
    yield
  except user_error_types() as e:  # pylint: disable=catching-non-exception
    logging.flush()
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
