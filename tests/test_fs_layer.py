"""Every path a user gives goes through script_jax/fs.py, so `gs://` works wherever a local path does.

The guard parses each module of the package and fails on a bare `open(`, `os.path.exists` and the
like outside fs.py and the allow-list below. The layer itself is tested here on local paths and on
TF's in-memory `ram://` file system (a real non-local file system served by the same tf.io.gfile
code path as `gs://`).
"""

import ast
import os

import pytest
from helpers import ROOT

from script_jax import fs

PACKAGE = os.path.join(ROOT, "script_jax")

# Calls that touch a file system by path: outside fs.py they bypass the layer.
FORBIDDEN_ATTRIBUTES = {
    ("os", "makedirs"), ("os", "remove"), ("os", "unlink"), ("os", "replace"), ("os", "rename"),
    ("os", "listdir"), ("os", "walk"), ("os", "scandir"), ("glob", "glob"), ("glob", "iglob"),
    ("gzip", "open"), ("io", "open"), ("tempfile", "mkstemp"), ("tempfile", "mkdtemp"),
    ("os.path", "exists"), ("os.path", "isdir"), ("os.path", "isfile"), ("os.path", "getsize"),
    ("os.path", "abspath"), ("os.path", "getmtime"),
}
FORBIDDEN_MODULES = {"shutil", "tf.io.gfile"}  # any call

# module:function -> why a path there is never a user's path (or never remote).
ALLOWED = {
    "script_jax/fs.py:*": "the layer itself",
    "script_jax/config_lib.py:<module>": "the package's own assets folder (BERT_UNCASED_VOCAB)",
    "script_jax/bench/step_timing.py:_snapshot": "reads /proc/stat, the machine's CPU counters",
    "script_jax/bench/step_timing.py:environment": "reads /proc/cpuinfo",
    "script_jax/bench/scoring_speed.py:cpu_name": "reads /proc/cpuinfo",
    "script_jax/run_lock.py:_process_start": "reads /proc/PID/stat, a process's start time",
    "script_jax/bench/tpu_programs.py:_tpu_attached": "looks for TPU device files in /dev",
    "script_jax/bench/resume_on_gcs_emulator.py:<module>": "finds the repository's tests/ folder",
}


def _dotted(node) -> str:
  if isinstance(node, ast.Name):
    return node.id
  if isinstance(node, ast.Attribute):
    return f"{_dotted(node.value)}.{node.attr}"
  return ""


def file_system_calls(source: str) -> list[tuple[str, int, str]]:
  """(enclosing function or "<module>", line, call) of each call that bypasses the layer."""
  found = []

  def visit(node, function):
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
        visit(child, child.name)
        continue
      if isinstance(child, ast.Call):
        func = child.func
        name = None
        if isinstance(func, ast.Name) and func.id == "open":
          name = "open"
        elif isinstance(func, ast.Attribute):
          owner = _dotted(func.value)
          if (owner, func.attr) in FORBIDDEN_ATTRIBUTES or owner in FORBIDDEN_MODULES:
            name = f"{owner}.{func.attr}"
        if name:
          found.append((function, child.lineno, name))
      visit(child, function)

  visit(ast.parse(source), "<module>")
  return found


def test_checker_catches_bare_file_calls():
  snippet = """
import os, shutil, glob, gzip
x = open("a")
def f(p):
  with open(p) as g:
    return os.path.exists(p) or os.path.isdir(p), os.makedirs(p, exist_ok=True)
def g(p):
  shutil.copyfile(p, p + ".bak"); glob.glob(p); gzip.open(p); os.replace(p, p); os.listdir(p)
  tf.io.gfile.exists(p)
def fine(p):
  from script_jax import fs
  return fs.open(p), fs.exists(p), os.path.join(p, "x"), os.path.basename(p), os.getpid()
"""
  calls = file_system_calls(snippet)
  assert [(f, n) for f, _, n in calls] == [
      ("<module>", "open"), ("f", "open"), ("f", "os.path.exists"), ("f", "os.path.isdir"),
      ("f", "os.makedirs"), ("g", "shutil.copyfile"), ("g", "glob.glob"), ("g", "gzip.open"),
      ("g", "os.replace"), ("g", "os.listdir"), ("g", "tf.io.gfile.exists")]


def test_package_opens_paths_only_through_the_layer():
  offenders = []
  for root, _, names in os.walk(PACKAGE):
    for name in sorted(names):
      if not name.endswith(".py"):
        continue
      path = os.path.join(root, name)
      module = os.path.relpath(path, ROOT)
      if f"{module}:*" in ALLOWED:
        continue
      with open(path) as f:
        source = f.read()
      for function, line, call in file_system_calls(source):
        if f"{module}:{function}" not in ALLOWED:
          offenders.append(f"{module}:{line} ({function}): {call}(...)")
  assert not offenders, ("Use script_jax.fs (gs:// and local alike) instead of:\n  " +
                         "\n  ".join(offenders))


def test_allow_list_names_live_functions():
  """A stale allow-list entry would silently allow a new call somewhere else."""
  for entry in ALLOWED:
    module, function = entry.split(":")
    if function == "*":
      continue
    with open(os.path.join(ROOT, module)) as f:
      functions = {f for f, _, _ in file_system_calls(f.read())}
    assert function in functions, f"{entry} no longer opens a path: drop it from ALLOWED"


@pytest.mark.parametrize("scheme", ["local", "ram"])
def test_layer_operations(tmp_path, scheme):
  base = str(tmp_path) if scheme == "local" else f"ram://fs-test-{os.getpid()}"
  folder = fs.join(base, "a", "b")
  assert fs.is_remote(folder) == (scheme == "ram")
  fs.makedirs(folder)
  fs.makedirs(folder)  # exists already: fine
  assert fs.isdir(folder) and not fs.isfile(folder)
  path = fs.join(folder, "x.json")
  fs.write_atomically(path, '{"a": 1}\n')
  assert fs.isfile(path) and fs.exists(path) and fs.getsize(path) == 9
  with fs.open(path, "a") as f:
    f.write("more\n")
  assert fs.read_bytes(path) == b'{"a": 1}\nmore\n'
  fs.copy(path, fs.join(folder, "y.json"))
  fs.replace(fs.join(folder, "y.json"), fs.join(folder, "z.json"))
  assert fs.listdir(folder) == ["x.json", "z.json"] or sorted(fs.listdir(folder)) == [
      "x.json", "z.json"]
  assert fs.glob(fs.join(folder, "*.json")) == [fs.join(folder, "x.json"),
                                               fs.join(folder, "z.json")]
  assert [(r, sorted(n)) for r, _, n in fs.walk(fs.join(base, "a")) if n] == [
      (folder, ["x.json", "z.json"])]
  fs.write_json_atomically(path, {"b": [1, "é"], "a": None})
  assert fs.read_bytes(path) == b'{\n  "a": null,\n  "b": [\n    1,\n    "\\u00e9"\n  ]\n}\n'
  assert fs.read_json(path) == {"a": None, "b": [1, "é"]}
  fs.write_json_atomically(path, {"b": 1, "a": 2}, indent=None, sort_keys=False)
  assert fs.read_bytes(path) == b'{"b": 1, "a": 2}\n'
  fs.write_atomically(path, b"\xef\xbb\xbf[1]")  # a byte-order mark, as Windows editors write
  assert fs.read_json(path) == [1]
  fs.write_atomically(path, "{not json")
  with pytest.raises(ValueError):
    fs.read_json(path)
  with pytest.raises(LookupError, match=f"^dev file {path} is not JSON"):
    fs.read_json_for_user(path, LookupError, "dev file")
  assert [n for n in fs.listdir(folder) if ".tmp" in n] == []
  fs.remove(path)
  assert not fs.exists(path)
  with pytest.raises(FileNotFoundError):
    fs.read_json(path)
  with pytest.raises(LookupError, match=f"^{path} does not exist$"):
    fs.read_json_for_user(path, LookupError)
  assert fs.abspath("gs://bucket/run") == "gs://bucket/run"
  assert fs.abspath("rel") == os.path.join(os.getcwd(), "rel")
  assert fs.dirname("gs://bucket/run/") == "gs://bucket"
