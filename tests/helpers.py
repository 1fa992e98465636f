"""Helpers the tests import (`from helpers import ...`; pytest puts tests/ on sys.path): the
repository's paths, configs by name, the entry points run as a user runs them, tiny corpora and
workdirs built once per test run. Fixtures and the environment set before JAX is imported live in
conftest.py."""

import fcntl
import os
import shutil
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")


def load_config(name: str, **overrides):
  """configs/<name>.py's get_config(), with dotted-key overrides ("model.dtype"=...)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(f"config_{name}",
                                                os.path.join(CONFIGS, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def run_main(args, timeout=600, env=None):
  """Runs `python -m script_jax.main ARGS` as a user would; returns the CompletedProcess."""
  full_env = dict(os.environ)
  full_env["XLA_FLAGS"] = ""  # the entry point runs on the one real CPU device
  full_env.update(env or {})
  return subprocess.run([sys.executable, "-m", "script_jax.main", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout, env=full_env)


def random_batch(config, batch_size, seed):
  """A ragged masked batch (synthetic.random_masked_batch) as jax arrays, for the losses."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from script_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  return {k: jnp.asarray(v) for k, v in
          synthetic.random_masked_batch(config, batch_size, seed, ragged=True).items()}


def run_steps(config, devices, batch_list):
  """Train steps on `devices` from the config's initial state: (final params, losses)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from script_jax import models, train  # pylint: disable=g-import-not-at-top,g-multiple-import
  from script_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from script_jax import state as state_lib  # pylint: disable=g-import-not-at-top
  mesh = sharding_lib.create_mesh(config, devices=devices)
  model = models.build_model(config)
  state, sharding = state_lib.init_state(config, model, mesh)
  step = train.make_train_step(config, model, sharding, mesh)
  losses = []
  for b in batch_list:
    state, metrics = step(state, train.to_global_batch({k: np.asarray(v) for k, v in b.items()},
                                                       mesh))
    losses.append(float(metrics["loss"]))
  return jax.device_get(state.params), losses


def _training_lines(count=400):
  from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top
  lines = [l.strip() for t in topics.values() for l in t.splitlines() if len(l.split()) > 4]
  return lines[:count]


def write_tiny_corpus(root) -> str:
  """400 lines of text as 10 documents of 40 lines (the first is held out for evaluation)."""
  source = os.path.join(str(root), "corpus.txt")
  lines = _training_lines()
  with open(source, "w") as f:
    f.write("\n\n".join("\n".join(lines[i:i + 40]) for i in range(0, len(lines), 40)) + "\n")
  return source


def tiny_pretraining_flags(source: str) -> list[str]:
  """Two steps of a one-layer tiny model with a 512-piece SentencePiece tokenizer, a checkpoint
  and a held-out evaluation at each step (two points for a curve). The same flags everywhere,
  so that the compiled programs are shared through the compilation cache."""
  return [
      "--config=configs/tiny.py", f"--config.data.source={source}",
      "--config.model.vocab_size=512", "--config.data.num_shards=1",
      "--config.model.num_layers=1", "--config.electra.generator_num_layers=1",
      "--config.seq_len=32", "--config.batch_size=8", "--config.num_train_steps=2",
      "--config.optim.warmup_steps=0", "--config.checkpoint_every_steps=1",
      "--config.eval_every_steps=1"]


def make_workdir(root, objective="script"):
  """A pretraining workdir made by the real entry point (tiny_pretraining_flags: random-ish
  weights)."""
  workdir = os.path.join(str(root), f"workdir_{objective}")
  result = run_main([*tiny_pretraining_flags(write_tiny_corpus(root)), f"--workdir={workdir}",
                     f"--config.objective={objective}"])
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def run_module(module, args, stdin=None, timeout=300, env=None):
  """`python -m script_jax.<module> ARGS` as a user runs it, on the one real CPU device (unless
  `env` says otherwise)."""
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", **(env or {})}
  return subprocess.run([sys.executable, "-m", f"script_jax.{module}", *args], cwd=ROOT,
                        input=stdin, capture_output=True, timeout=timeout, env=env)


def build_once(tmp_path_factory, name, build):
  """`build(folder) -> str` run once per test run, by whichever process asks first (pytest-xdist
  workers share the base temporary folder's parent); the others wait for it and get its result.
  What it builds is shared: tests read it and write elsewhere."""
  base = tmp_path_factory.getbasetemp()
  root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  folder, done = root / f"shared_{name}", root / f"shared_{name}.done"
  with open(root / f"shared_{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    if not done.exists():
      shutil.rmtree(folder, ignore_errors=True)  # a build that failed half-way
      folder.mkdir()
      done.write_text(build(folder))
    return done.read_text()


def tiny_prepared_data(tmp_path_factory) -> str:
  """The embedded corpus prepared for configs/tiny.py once per test run (as the first run of
  main does), shared by every test that trains on it: its folder."""
  from script_jax.data import preparation  # pylint: disable=g-import-not-at-top

  def build(folder):
    preparation.prepare_pretraining_data(load_config("tiny"), str(folder))
    return str(folder / "data")
  return build_once(tmp_path_factory, "tiny_prepared", build)


def shared_workdir(tmp_path_factory, objective="script"):
  """One tiny pretraining workdir per objective per test run, for the scoring, rescoring,
  fine-tuning and export tests (building it runs the trainer once)."""
  return build_once(tmp_path_factory, f"workdir_{objective}",
                    lambda folder: make_workdir(folder, objective))


def lowbias32_numpy(x):
  """Wellons' lowbias32 on uint32, written from its definition (not from the kernels' mix32)."""
  x = np.asarray(x, np.uint32)
  x ^= x >> np.uint32(16)
  x = (x.astype(np.uint64) * 0x7FEB352D % 2 ** 32).astype(np.uint32)
  x ^= x >> np.uint32(15)
  x = (x.astype(np.uint64) * 0x846CA68B % 2 ** 32).astype(np.uint32)
  return x ^ (x >> np.uint32(16))
