"""One path from a mistake a user can fix to `error: <message>` and exit status 2, no traceback.

Every error class whose message is the whole story for the user subclasses `UserError`
(ConfigError, DataError, CheckpointMismatchError, ScoringError, NonFiniteLossError, the
fine-tuning errors ...); a missing file counts too. Each command's `main` runs its body through
`run_cli`, or wraps it in `friendly_errors()`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import sys
from typing import Callable, Sequence

from absl import app
from absl import flags
from absl import logging
from script_jax import fs


class UserError(ValueError):
  """A mistake the user can fix; the message says what and how."""


USER_ERRORS = (UserError, FileNotFoundError)


def is_user_error(error: BaseException) -> bool:
  """Whether `error` is reported as one message with exit status 2."""
  return isinstance(error, USER_ERRORS)


# A path with a scheme (gs://, ram://, s3:// ...) in an error's text, not the HTTP endpoint.
_REMOTE_PATH = re.compile(r"\b(?!https?://)[a-z][a-z0-9+.-]*://[^\s'\",;]+")
_UNREACHABLE = ("resolve host", "could not connect", "timeout was reached", "retry attempts failed",
                "connection refused", "network is unreachable")


def _cause_and_fix(error: BaseException, path: str) -> tuple[str, str]:
  """What went wrong on `path` and what the user does about it, from TensorFlow's error class
  and the HTTP status or curl failure in its message."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (heavy: tensorflow)
  text = str(error).lower()
  bucket = fs.bucket_root(path) or path
  # TF's GCS client reports HTTP 401 (no valid credentials) as PermissionDeniedError too.
  if isinstance(error, tf.errors.UnauthenticatedError) or "response code 401" in text:
    return ("no valid credentials",
            "run `gcloud auth application-default login`, or run on a VM with a service account")
  if isinstance(error, tf.errors.PermissionDeniedError) or "response code 403" in text:
    return ("this account may not use the bucket",
            f"grant it object read and write: gcloud storage buckets add-iam-policy-binding "
            f"{bucket} --member=serviceAccount:ACCOUNT --role=roles/storage.objectAdmin "
            "(the account is `gcloud auth list`'s, or on a VM its service account: "
            "launch/tpu.sh check prints it)")
  if isinstance(error, tf.errors.NotFoundError) and "bucket" in text:
    return ("no such bucket",
            f"check its name, or create it: gcloud storage buckets create {bucket} "
            "--location=REGION (the TPU's region)")
  if isinstance(error, (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
                        tf.errors.AbortedError)) or any(u in text for u in _UNREACHABLE):
    waited = ("" if "retry attempts failed" not in text else
              ", after TensorFlow's retries (about 30 s; 90 s for a host that never answers; "
              "fs.GCS_WAIT_DEFAULTS, the GCS_RETRY_CONFIG_* variables set them)")
    return ("the storage service cannot be reached" + waited,
            "check the network and the proxy settings; a VM without an external IP needs "
            "Private Google Access or Cloud NAT")
  if isinstance(error, tf.errors.NotFoundError):
    return "not found", "check the path"
  return ("the file system refused it",
          "check the network, the credentials (gcloud auth application-default login, or the "
          "VM's service account) and that the bucket exists and this account may read and "
          "write it")


def remote_storage_problem(error: BaseException) -> str | None:
  """One line for TensorFlow's file-system errors on a path with a scheme (gs://, ram://):
  the path, the cause (unreachable, no credentials, no such bucket, no permission) and the fix;
  None for anything else."""
  tf = sys.modules.get("tensorflow")
  if tf is None:
    return None
  # fs.open's files raise OSError from TensorFlow's error, with the path in front.
  op_error = error if isinstance(error, tf.errors.OpError) else error.__cause__
  if not isinstance(op_error, tf.errors.OpError):
    return None
  paths = [p.rstrip(":.)") for p in _REMOTE_PATH.findall(f"{error} {op_error}")]
  if not paths:
    return None
  cause, fix = _cause_and_fix(op_error, paths[0])
  detail = " ".join(str(op_error.message).split())[:300]
  return f"cannot use {paths[0]}: {cause}. {fix}. (TensorFlow: {detail})"


# A write refused for lack of room: a full disk, a quota, a file-size limit (ulimit -f).
_NO_ROOM = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
            errno.EFBIG: "the file is larger than this process may write (ulimit -f)"}


def no_room_problem(error: BaseException) -> str | None:
  """One line for a write that failed for lack of room (on the error or its causes); None for
  anything else. Everything a command writes can be rerun over: what was finished is kept."""
  seen = error
  while seen is not None:
    code, path = None, None
    if isinstance(seen, OSError) and seen.errno in _NO_ROOM:
      code, path = seen.errno, seen.filename
    else:  # TensorFlow's writers give the path and the C library's text, no errno
      text = str(seen)
      code = next((c for c in _NO_ROOM if text.endswith(os.strerror(c))), None)
      path = text.rsplit(";", 1)[0].strip() if code and ";" in text else None
    if code is not None:
      where = f" writing {path}" if path else ""
      return (f"no room{where}: {_NO_ROOM[code]} ({os.strerror(code)}). Free space (or raise "
              "the limit) and run the same command again: what was finished before is kept "
              "and picked up.")
    seen = seen.__cause__ or seen.__context__
  return None


# Why a write failed, as the C library words it; found anywhere in a long message (tensorstore
# puts the path and its source locations around it).
_WRITE_FAILURES = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EROFS, errno.EIO)


def write_failure_reason(text: str) -> str | None:
  """The C library's words for why a write failed ("File too large", ...) if `text` has them."""
  return next((os.strerror(c) for c in _WRITE_FAILURES if os.strerror(c) in text), None)


@contextlib.contextmanager
def friendly_errors():
  """Prints `error: <message>` and exits with status 2 for the errors a user can fix (and for
  remote paths that cannot be used: remote_storage_problem)."""
  try:
    yield
  except KeyboardInterrupt:  # Ctrl-C outside the training loop, which saves and stops itself
    print("\nerror: interrupted (Ctrl-C).", file=sys.stderr)
    sys.exit(130)
  except Exception as e:  # pylint: disable=broad-except
    message = (remote_storage_problem(e) or no_room_problem(e) or
               (str(e) if is_user_error(e) else None))
    if message is None:
      raise
    logging.flush()
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _flag_value(argv: Sequence[str], name: str) -> str | None:
  """The value of --name=VALUE (or --name VALUE) in argv; None when absent."""
  for k, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
    if arg == f"--{name}" and k + 1 < len(argv):
      return argv[k + 1]
  return None


def flags_problem(error: BaseException, argv: Sequence[str]) -> str:
  """One line for a mistake on the command line: a flag absl refuses, or a --config file that
  cannot be loaded (missing, a syntax error, an unknown key, a value of the wrong type)."""
  config_path = _flag_value(argv, "config")
  if isinstance(error, SyntaxError):
    return (f"the config file {error.filename} has a syntax error at line {error.lineno}: "
            f"{error.msg}")
  if isinstance(error, AttributeError) and str(error).strip("\"'").isidentifier():
    key = str(error).strip("\"'")
    given = [a.split("=", 1)[0] for a in argv if a.startswith("--config.") and
             f".{key}" in a.split("=", 1)[0]]
    return (f"unknown config key {key!r} ({', '.join(given) or 'in the config file'}); every "
            "key and its default are in script_jax/config_lib.py (base_config)")
  if config_path is not None and isinstance(error, OSError):
    config_file = config_path.split(":", 1)[0]
    if not fs.exists(config_file):
      return f"the config file {config_file} (--config) does not exist"
  text = " ".join(str(error).split())
  if isinstance(error, flags.Error):
    return text
  return f"cannot load the config {config_path}: {type(error).__name__}: {text}"


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing (for `app.run(main, flags_parser=parse_flags)`), with a mistake on the
  command line reported as one `error:` line and exit status 2 instead of a traceback."""
  try:
    remaining = flags.FLAGS(argv)
    if "config" in flags.FLAGS and flags.FLAGS["config"].value is not None:
      flags.FLAGS["config"].value.keys()  # config_flags reports a failed load at first use
    return remaining
  except Exception as e:  # pylint: disable=broad-except
    print(f"error: {flags_problem(e, argv)}", file=sys.stderr)
    sys.exit(2)


def run_cli(argv: Sequence[str], body: Callable[[], object], quiet: bool = True):
  """The shared `main` of the commands: no stray arguments, quiet libraries (unless
  --verbosity is given), and user errors as one message with exit status 2. Returns what
  `body` returns."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if quiet and not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)  # orbax logs each restore at INFO and WARNING
  with friendly_errors():
    return body()
