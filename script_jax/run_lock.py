"""One live run per workdir: WORKDIR/run.lock, taken before the run writes anything else.

Two runs on one workdir would replace each other's checkpoints and metrics records. The trainer
holds the lock for the whole run (`with run_lock.hold(workdir): ...`); a second start is refused
with the holder's host, process id and start time.

- Local (and NFS) workdirs: an exclusive `flock` on run.lock, which the kernel releases when the
  holder exits, however it exits. The file keeps the holder's name while it runs and is emptied
  when it ends; finding a name in a lock nobody holds means its run died (kill -9, a crash):
  the lock is taken over with a warning.
- Object stores (gs://) have no flock: run.lock is a lease object created only if absent (an
  if-generation-match=0 precondition through google-cloud-storage when installed, see
  fs.create_if_absent; without it a check then a write) and deleted at the end. One left by a
  dead process on this host is taken over with a warning; one from another host is not (this
  host cannot tell whether it still runs): the refusal says to delete it once that run is gone.
- On several hosts process 0 takes the lock and tells the others whether it got it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from script_jax import cli_errors
from script_jax import fs

LOCK_FILE = "run.lock"


class WorkdirBusyError(cli_errors.UserError):
  """Another live run holds the workdir, or the workdir cannot be used."""


def _process_start(pid: int) -> str | None:
  """The process's start time in clock ticks since boot (/proc), telling a reused pid apart."""
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:  # a system file, not a user's path
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _me() -> dict:
  return {"host": socket.gethostname(), "pid": os.getpid(),
          "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
          "process_start": _process_start(os.getpid())}


def _describe(holder: dict) -> str:
  return (f"host {holder.get('host', '?')}, process {holder.get('pid', '?')}, started "
          f"{holder.get('started', '?')}")


def _parse(text: str) -> dict | None:
  try:
    holder = json.loads(text)
  except ValueError:
    return None
  return holder if isinstance(holder, dict) else None


def _is_alive_here(holder: dict) -> bool:
  """Whether the holder, a process on this host, still runs (False for a reused pid)."""
  pid = holder.get("pid")
  if not isinstance(pid, int):
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # another user's process: alive
  recorded, now = holder.get("process_start"), _process_start(pid)
  return recorded is None or now is None or recorded == now


def _busy(workdir: str, path: str, holder: dict | None, hint: str = "") -> WorkdirBusyError:
  who = _describe(holder) if holder else "a run whose lock names no holder"
  return WorkdirBusyError(
      f"another run is using --workdir {workdir} ({who}; lock {path}). Two runs in one workdir "
      "overwrite each other's checkpoints and metrics: wait for it to end or stop it, or use "
      f"another --workdir.{hint}")


def _check_usable(workdir: str) -> None:
  if fs.exists(workdir) and not fs.isdir(workdir):
    raise WorkdirBusyError(f"--workdir {workdir} is a file, not a folder; give a folder (it is "
                           "created if missing).")


def _acquire_local(workdir: str, path: str):
  try:
    fs.makedirs(workdir)
    handle = fs.lock_exclusive(path)
  except OSError as e:
    raise WorkdirBusyError(f"cannot write in --workdir {workdir}: {e.strerror or e}. Use a "
                           "folder this user may write to.") from e
  if handle is None:
    with fs.open(path) as f:
      raise _busy(workdir, path, _parse(f.read()))
  handle.seek(0)
  previous = handle.read().strip()
  if previous:
    logging.warning("Taking over %s from a run that ended without releasing it (%s).", path,
                    _describe(_parse(previous) or {}))
  handle.seek(0)
  handle.truncate()
  handle.write(json.dumps(_me()))
  handle.flush()

  def release():
    handle.seek(0)
    handle.truncate()  # empty: released cleanly
    handle.close()
  return release


def _acquire_remote(workdir: str, path: str):
  fs.makedirs(workdir)  # names the bucket's problem (missing, unreachable) in one line
  me = json.dumps(_me())
  if not fs.create_if_absent(path, me):
    with fs.open(path) as f:
      holder = _parse(f.read()) or {}
    if holder.get("host") != socket.gethostname() or _is_alive_here(holder):
      raise _busy(workdir, path, holder,
                  f" If that run is gone (its host stopped), delete {path} and start again.")
    logging.warning("Taking over %s from a run on this host that ended without releasing it "
                    "(%s).", path, _describe(holder))
    fs.remove(path)
    if not fs.create_if_absent(path, me):
      with fs.open(path) as f:
        raise _busy(workdir, path, _parse(f.read()))
  return lambda: fs.remove(path)


@contextlib.contextmanager
def hold(workdir: str):
  """Holds WORKDIR's run lock for the body (process 0 on several hosts); WorkdirBusyError when
  another live run has it, or when the workdir is a file or cannot be written."""
  path = fs.join(workdir, LOCK_FILE)
  release, problem = None, None
  if jax.process_index() == 0:
    try:
      _check_usable(workdir)
      release = (_acquire_remote if fs.is_remote(workdir) else _acquire_local)(workdir, path)
    except WorkdirBusyError as e:
      problem = e
  if jax.process_count() > 1:
    held = multihost_utils.broadcast_one_to_all(np.int32(problem is None and
                                                         jax.process_index() == 0))
    if not held and jax.process_index() != 0:
      raise WorkdirBusyError(f"process 0 could not take the lock of --workdir {workdir} "
                             "(its log says why).")
  if problem is not None:
    raise problem
  try:
    yield
  finally:
    if release is not None:
      release()
