"""Every `python -m script_jax...` command the docs show is a module that exists, and each
command module imports and defines a main (so a renamed or moved module cannot leave a stale command);
every pretraining config key has its row in docs/config.md; every relative link in README.md and
docs/ resolves."""

import glob
import importlib.util
import os
import re
import subprocess
import sys

import pytest
from helpers import ROOT

_DOC_FILES = ["README.md", "docs/*.md", "script_jax/bench/README.md", "launch/README.md",
              "colab/README.md", "configs/*.py", "script_jax/bench/gpu_check.sh"]
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


@pytest.mark.slow
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


def test_every_pretraining_config_key_has_a_row_in_docs_config():
  from script_jax import config_lib  # pylint: disable=g-import-not-at-top

  def keys(config, prefix=""):
    for name, value in config.items():
      if hasattr(value, "items"):
        yield from keys(value, f"{prefix}{name}.")
      else:
        yield prefix + name

  with open(os.path.join(ROOT, "docs", "config.md"), encoding="utf-8") as f:
    text = f.read()
  missing = [k for k in keys(config_lib.base_config()) if f"`{k}`" not in text]
  assert not missing, f"docs/config.md has no row for {missing}"


_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)|^\[[^\]]+\]:\s*(\S+)", re.M)


def _anchors(path):
  """GitHub's anchors of a Markdown file's headings (outside code blocks)."""
  with open(path, encoding="utf-8") as f:
    text = re.sub(r"```.*?```", "", f.read(), flags=re.S)
  return {re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
          for m in re.finditer(r"^#+\s+(.*)$", text, re.M)}


def test_relative_links_in_the_docs_resolve():
  """Every relative link in README.md, docs/*.md and the folders' READMEs names a file that
  exists, and its #anchor a heading of that file."""
  broken = []
  for path in [os.path.join(ROOT, "README.md"), *glob.glob(os.path.join(ROOT, "docs", "*.md")),
               *glob.glob(os.path.join(ROOT, "*", "README.md"))]:
    with open(path, encoding="utf-8") as f:
      text = f.read()
    for match in _LINK.finditer(text):
      target = match.group(1) or match.group(2)
      if re.match(r"[a-z]+:", target):
        continue
      name, _, anchor = target.partition("#")
      dest = os.path.normpath(os.path.join(os.path.dirname(path), name)) if name else path
      if not os.path.exists(dest):
        broken.append(f"{os.path.relpath(path, ROOT)}: {target} (no such file)")
      elif anchor and dest.endswith(".md") and anchor not in _anchors(dest):
        broken.append(f"{os.path.relpath(path, ROOT)}: {target} (no such heading)")
  assert not broken, "\n".join(broken)
