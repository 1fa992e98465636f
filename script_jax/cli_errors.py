"""One path from a mistake a user can fix to `error: <message>` and exit status 2, no traceback.

Every error class whose message is the whole story for the user subclasses `UserError`
(ConfigError, DataError, CheckpointMismatchError, ScoringError, NonFiniteLossError, the
fine-tuning errors ...); a missing file counts too. Each command's `main` runs its body through
`run_cli`, or wraps it in `friendly_errors()`.
"""

from __future__ import annotations

import contextlib
import re
import sys
from typing import Callable, Sequence


class UserError(ValueError):
  """A mistake the user can fix; the message says what and how."""


USER_ERRORS = (UserError, FileNotFoundError)


def is_user_error(error: BaseException) -> bool:
  """Whether `error` is reported as one message with exit status 2."""
  return isinstance(error, USER_ERRORS)


def remote_storage_problem(error: BaseException) -> str | None:
  """One line for TensorFlow's file-system errors on a gs:// path (no network or credentials, no
  such bucket, no permission), None for anything else."""
  tf = sys.modules.get("tensorflow")
  if tf is None or not isinstance(error, tf.errors.OpError):
    return None
  paths = re.findall(r"gs://[^\s'\"]+", str(error))
  if not paths:
    return None
  detail = " ".join(str(error.message).split())
  return (f"cannot use {paths[0]}: {detail[:300]}. Check the network, the credentials "
          "(gcloud auth application-default login, or the VM's service account) and that the "
          "bucket exists and this account may read and write it.")


@contextlib.contextmanager
def friendly_errors():
  """Prints `error: <message>` and exits with status 2 for the errors a user can fix (and for
  gs:// paths that cannot be reached)."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    message = str(e) if is_user_error(e) else remote_storage_problem(e)
    if message is None:
      raise
    from absl import logging  # pylint: disable=g-import-not-at-top
    logging.flush()
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def run_cli(argv: Sequence[str], body: Callable[[], object], quiet: bool = True):
  """The shared `main` of the commands: no stray arguments, quiet libraries (unless
  --verbosity is given), and user errors as one message with exit status 2. Returns what
  `body` returns."""
  from absl import app, flags, logging  # pylint: disable=g-import-not-at-top,g-multiple-import
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if quiet and not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)  # orbax logs each restore at INFO and WARNING
  with friendly_errors():
    return body()
