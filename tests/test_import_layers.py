"""The package's import graph runs one way: each module imports only modules of its own layer or
of the layers below (imports inside functions included). The layers, bottom up, are below; a new
module is given one here, which is where a reader learns what it may use."""

import ast
import collections
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "script_jax")

# Bottom up. A module is named by its dotted path under script_jax ("" is the package itself);
# a package name stands for each of its modules not named on its own.
LAYERS = (
    ("", "fs", "cli_errors"),                              # paths and error reporting
    ("pallas_common",),                                    # what the kernels share
    ("random_bits", "fused_attention", "models", "metrics_records", "metrics_log", "run_lock",
     "launch_check"),
    ("sharding", "fused_logsumexp", "config_lib"),         # meshes, kernels, configs
    ("objectives", "state", "data"),                       # losses, train state, input data
    ("checkpoints", "evaluation"),
    ("interop",),                                          # HuggingFace folders <-> params
    ("train",),                                            # the pretraining loop
    ("scoring", "finetune", "interop.hf", "interop.hf_export"),  # stages on a pretrained model
    ("experiments", "bench"),                              # runs and measurements of the above
    ("main",),
)


def _layer_of():
  layer = {}
  for index, names in enumerate(LAYERS):
    for name in names:
      layer[name] = index
  return layer


def _modules() -> dict[str, str]:
  modules = {}
  for folder, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(folder, f)
        name = os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, ".")
        modules[name[:-len("__init__")].rstrip(".") if name.endswith("__init__") else name] = path
  return modules


def _imports(path: str, modules) -> set[str]:
  found = set()
  for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    for n in names:
      if n == "script_jax" or n.startswith("script_jax."):
        short = n[len("script_jax."):] if n != "script_jax" else ""
        if short in modules:
          found.add(short)
  return found


def layer(name: str) -> int:
  table = _layer_of()
  parts = name.split(".")
  for k in range(len(parts), -1, -1):
    key = ".".join(parts[:k])
    if key in table:
      return table[key]
  raise KeyError(name)


def test_every_module_has_a_layer():
  missing = []
  for name in _modules():
    try:
      layer(name)
    except KeyError:
      missing.append(name)
  assert not missing, f"give these modules a layer in LAYERS: {missing}"


def test_no_module_imports_from_a_higher_layer():
  modules = _modules()
  upward = collections.defaultdict(list)
  for name, path in modules.items():
    for target in _imports(path, modules):
      if layer(target) > layer(name):
        upward[name].append(target)
  assert not upward, f"imports that run up the layers: {dict(upward)}"
