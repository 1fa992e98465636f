"""The one file-system layer: every path a user gives goes through here, local or `gs://`.

Local paths are served by the standard library; paths with a scheme (`gs://...`, and TF's
in-memory `ram://...`, which the tests use) by `tf.io.gfile`, the layer big_vision uses. TensorFlow
is imported only when a remote path is touched, so modules that must start fast (data/corpus.py,
the tokenizer worker processes of data/writer.py) stay light on local paths.

Orbax and TensorBoard speak `gs://` themselves; `abspath` keeps such paths untouched for them.
`tests/test_fs_layer.py` fails if a module of the package opens a path with `open`/`os.path` again.
"""

from __future__ import annotations

import builtins
import functools
import glob as _glob
import json
import os
import shutil
import types
from typing import IO


# TensorFlow's GCS client waits up to ~25 minutes by default before giving up on a host that
# does not answer (11 tries of a 120 s connect timeout, 191 s of back-off between them). These
# defaults bound it: 6 tries of at most 10 s to connect, 1+2+4+8+16 s of back-off (plus up to
# 1 s of jitter each), so about 31 s for a refused or unresolvable host and 91 s for a silent
# one. They are read once, when TensorFlow is imported, and a variable the user set wins.
GCS_WAIT_DEFAULTS = {
    "GCS_RETRY_CONFIG_MAX_RETRIES": "5",
    "GCS_RETRY_CONFIG_INIT_DELAY_TIME_US": "1000000",
    "GCS_RETRY_CONFIG_MAX_DELAY_TIME_US": "16000000",
    "GCS_REQUEST_CONNECTION_TIMEOUT_SECS": "10",
}


def bound_remote_waits() -> None:
  """Sets GCS_WAIT_DEFAULTS in the environment where unset; call before TensorFlow's import."""
  for name, value in GCS_WAIT_DEFAULTS.items():
    os.environ.setdefault(name, value)


def is_remote(path: str) -> bool:
  """True for paths with a scheme (`gs://bucket/x`, `ram://x`): served by tf.io.gfile."""
  return "://" in str(path)


def _naming(error, path: str):
  """The same TensorFlow error with `path` in front of its message."""
  return type(error)(error.node_def, error.op, f"{path}: {error.message}")


@functools.cache
def _gfile():
  """tf.io.gfile's functions, whose errors name the path they were given: TF's GCS client
  leaves it out of some (a refused request says only the HTTP status and body)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (heavy: tensorflow)

  def naming_the_path(function):
    @functools.wraps(function)
    def call(path, *args, **kwargs):
      try:
        return function(path, *args, **kwargs)
      except tf.errors.OpError as e:
        if str(path) in str(e.message):
          raise
        raise _naming(e, path) from e
    return call

  names = ("copy", "exists", "glob", "isdir", "listdir", "makedirs", "remove", "rename", "stat",
           "walk")
  return types.SimpleNamespace(**{n: naming_the_path(getattr(tf.io.gfile, n)) for n in names})


def bucket_root(path: str) -> str | None:
  """`gs://bucket` for a path in a GCS bucket, None for any other path."""
  if not str(path).startswith("gs://"):
    return None
  return "gs://" + path[len("gs://"):].split("/", 1)[0]


def abspath(path: str) -> str:
  """An absolute local path (with ~ expanded); a remote path unchanged."""
  if is_remote(path):
    return path
  return os.path.abspath(os.path.expanduser(path))


def join(path: str, *parts: str) -> str:
  """os.path.join that keeps `gs://bucket` intact (it only ever adds "/")."""
  return os.path.join(path, *parts)


def dirname(path: str) -> str:
  """The folder of a path; for `gs://bucket/x` it is `gs://bucket`."""
  return os.path.dirname(path.rstrip("/") if is_remote(path) else path)


def exists(path: str) -> bool:
  return _gfile().exists(path) if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _gfile().isdir(path) if is_remote(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
  """An existing path that is not a folder."""
  if is_remote(path):
    return _gfile().exists(path) and not _gfile().isdir(path)
  return os.path.isfile(path)


def makedirs(path: str) -> None:
  """Creates the folder and its parents; fine if it exists (GCS has no folders: a no-op there)."""
  if is_remote(path):
    bucket = bucket_root(path)
    # Under a missing bucket, TF's makedirs asks for the bucket again and again, forever (its
    # walk up the path stops at a folder that exists, and "/" is its own parent).
    if bucket:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top  (heavy: tensorflow)
      try:
        bucket_exists = _gfile().exists(bucket)
      except tf.errors.OpError as e:
        raise _naming(e, path) from e
      if not bucket_exists:
        raise tf.errors.NotFoundError(None, None, f"{path}: the bucket {bucket} does not exist")
    _gfile().makedirs(path)
  else:
    os.makedirs(path, exist_ok=True)


def open(path: str, mode: str = "r", encoding: str = "utf-8") -> IO:  # pylint: disable=redefined-builtin
  """A file object for local or remote paths ("r", "w", "a", with or without "b")."""
  if is_remote(path):
    if "r" in mode and not _gfile().exists(path):  # GFile opens lazily: say it now, as open() does
      raise FileNotFoundError(f"No such file: {path}")
    return _remote_file_class()(path, mode)
  if "b" in mode:
    return builtins.open(path, mode)
  return builtins.open(path, mode, encoding=encoding)


@functools.cache
def _remote_file_class():
  """tf.io.gfile.GFile whose errors are OSErrors, as callers of open() expect."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (heavy: tensorflow)

  def translated(method):
    @functools.wraps(method)
    def call(self, *args, **kwargs):
      try:
        return method(self, *args, **kwargs)
      except tf.errors.NotFoundError as e:
        raise FileNotFoundError(f"{self.name}: {e.message}") from e
      except tf.errors.OpError as e:  # cli_errors.remote_storage_problem reads the cause
        raise OSError(f"{self.name}: {e.message}") from e
    return call

  methods = ("read", "readline", "readlines", "write", "flush", "close", "seek", "tell",
             "__next__", "size")
  def writelines(self, lines):
    for line in lines:
      self.write(line)

  return type("RemoteFile", (tf.io.gfile.GFile,),
              {"writelines": writelines,
               **{m: translated(getattr(tf.io.gfile.GFile, m)) for m in methods}})


def glob(pattern: str) -> list[str]:
  """Sorted paths matching a pattern (`*`, `?`, `[...]`)."""
  if is_remote(pattern):
    return sorted(_gfile().glob(pattern))
  return sorted(_glob.glob(os.path.expanduser(pattern)))


def has_magic(pattern: str) -> bool:
  return _glob.has_magic(pattern)


def listdir(path: str) -> list[str]:
  """Names in a folder (no trailing "/" on sub-folders, whatever the file system)."""
  if is_remote(path):
    return [n.rstrip("/") for n in _gfile().listdir(path)]
  return os.listdir(path)


def walk(path: str):
  """os.walk for local and remote folders: (folder, subfolders, files), top-down."""
  if is_remote(path):
    for root, dirs, names in _gfile().walk(path):
      dirs_ = [d.rstrip("/") for d in dirs]
      yield root, dirs_, names
      dirs[:] = [d for d in dirs if d.rstrip("/") in dirs_]  # honour pruning by the caller
  else:
    yield from os.walk(path)


def remove(path: str) -> None:
  if is_remote(path):
    _gfile().remove(path)
  else:
    os.remove(path)


def replace(src: str, dst: str) -> None:
  """Renames src to dst, replacing dst: atomic on local disks; copy+delete on GCS."""
  if is_remote(src) or is_remote(dst):
    _gfile().rename(src, dst, overwrite=True)
  else:
    os.replace(src, dst)


def copy(src: str, dst: str) -> None:
  """Copies a file, replacing dst."""
  if is_remote(src) or is_remote(dst):
    _gfile().copy(src, dst, overwrite=True)
  else:
    shutil.copyfile(src, dst)


def getsize(path: str) -> int:
  return _gfile().stat(path).length if is_remote(path) else os.path.getsize(path)


def getmtime(path: str) -> float:
  """Seconds since the epoch of the last change."""
  return _gfile().stat(path).mtime_nsec / 1e9 if is_remote(path) else os.path.getmtime(path)


def read_bytes(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def write_atomically(path: str, data: str | bytes) -> None:
  """Writes a whole (small) file under a temporary name, then renames it into place."""
  tmp_path = f"{path}.tmp-{os.getpid()}"
  with open(tmp_path, "wb" if isinstance(data, bytes) else "w") as f:
    f.write(data)
  replace(tmp_path, path)


def read_json(path: str):
  """The JSON value in a file (UTF-8, a leading byte-order mark allowed): FileNotFoundError when
  it is absent, ValueError when it is not UTF-8 JSON. Callers word these for their users."""
  return json.loads(read_bytes(path).decode("utf-8-sig"))


def read_json_for_user(path: str, error: type[Exception], what: str = ""):
  """read_json with its failures worded for a user as `error`: "<what> <path> does not
  exist", "... is not JSON (...)", "cannot read <what> <path>: ..."."""
  named = f"{what} {path}" if what else path
  try:
    return read_json(path)
  except FileNotFoundError:
    raise error(f"{named} does not exist") from None
  except ValueError as e:
    raise error(f"{named} is not JSON ({e})") from None
  except OSError as e:
    raise error(f"cannot read {named}: {e}") from None


def write_json_atomically(path: str, value, indent: int | None = 2,
                          sort_keys: bool = True) -> None:
  """Writes `value` as JSON (indented, keys sorted and a final newline unless told otherwise)
  under a temporary name, then renames it into place: a reader never sees half a file."""
  write_atomically(path, json.dumps(value, indent=indent, sort_keys=sort_keys) + "\n")


def lock_exclusive(path: str) -> IO | None:
  """Opens (creating) a local file and takes an exclusive, non-blocking flock on it: the open
  file (keep it open: closing it releases the lock), or None when another process holds it.
  The kernel releases the lock when its holder exits, killed or not. Local paths only."""
  import fcntl  # pylint: disable=g-import-not-at-top  (optional: fcntl is POSIX-only)
  handle = builtins.open(path, "a+", encoding="utf-8")
  try:
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    handle.close()
    return None
  return handle


def create_if_absent(path: str, data: str) -> bool:
  """Writes a small file only if nothing is at `path`: True if this call created it.

  Atomic locally (O_EXCL) and on gs:// through google-cloud-storage's if-generation-match=0
  precondition when that client is installed. tf.io.gfile offers no precondition: on gs://
  without that client, and on other schemes, it is a check then a write, so two callers in the
  same second may both succeed.
  """
  if not is_remote(path):
    try:
      fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(data)
    return True
  if path.startswith("gs://"):
    try:
      from google.cloud import storage  # pylint: disable=g-import-not-at-top  (optional: google-cloud-storage)
      from google.api_core import exceptions  # pylint: disable=g-import-not-at-top  (optional: google-cloud-storage)
    except ImportError:
      storage = None
    if storage is not None:
      bucket, name = path[len("gs://"):].split("/", 1)
      try:
        storage.Client().bucket(bucket).blob(name).upload_from_string(data, if_generation_match=0)
      except exceptions.PreconditionFailed:
        return False
      return True
  if exists(path):
    return False
  with open(path, "w") as f:
    f.write(data)
  return True


def move_tree(src: str, dst: str) -> None:
  """Moves a folder (a rename locally; on object stores, where folders are name prefixes, each
  file is copied and then deleted)."""
  if not is_remote(src):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    os.replace(src, dst)
    return
  for root, _, names in walk(src):
    target = join(dst, root[len(src):].lstrip("/"))
    makedirs(target)
    for name in names:
      copy(join(root, name), join(target, name))
  for root, _, names in list(walk(src)):
    for name in names:
      remove(join(root, name))


def remove_tree(path: str) -> None:
  """Deletes a folder and everything in it."""
  if is_remote(path):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top  (heavy: tensorflow)
    tf.io.gfile.rmtree(path)
  else:
    shutil.rmtree(path)
