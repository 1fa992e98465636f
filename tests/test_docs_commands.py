"""Every `python -m script_jax...` command the docs show is a module that exists, and each
command module imports and defines a main (so a renamed or moved module cannot leave a stale command)."""

import glob
import importlib.util
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT

_DOC_FILES = ["README.md", "docs/*.md", "benchmarks/README.md", "launch/README.md",
              "colab/README.md", "configs/*.py", "benchmarks/gpu_check.sh"]
_COMMAND = re.compile(r"python3? -m (script_jax(?:\.[a-z_]+)*)")


def _documented_modules():
  found = {}
  for pattern in _DOC_FILES:
    for path in glob.glob(os.path.join(ROOT, pattern)):
      with open(path, encoding="utf-8") as f:
        for module in _COMMAND.findall(f.read()):
          found.setdefault(module, os.path.relpath(path, ROOT))
  return found


def test_the_docs_show_commands():
  modules = _documented_modules()
  assert {"script_jax.main", "script_jax.data.prepare", "script_jax.scoring.score",
          "script_jax.finetune.glue", "script_jax.bench.step_speed"} <= set(modules)


@pytest.mark.parametrize("module,doc", sorted(_documented_modules().items()))
def test_documented_command_exists(module, doc):
  assert importlib.util.find_spec(module) is not None, f"{doc} shows {module}, which is gone"


def test_command_modules_import_and_define_main():
  """One process imports every documented command module and checks it defines a main."""
  modules = sorted(m for m in _documented_modules() if m != "script_jax.main")
  code = ("import importlib, sys\n"
          "for name in sys.argv[1:]:\n"
          "  module = importlib.import_module(name)\n"
          "  assert callable(getattr(module, 'main', None)), name\n")
  result = subprocess.run([sys.executable, "-c", code, *modules], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
