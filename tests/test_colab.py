"""colab/quickstart.ipynb: valid nbformat, and executed headlessly (nbclient) on the CPU.

The notebook's short mode (documented in its last cell and colab/README.md) takes this checkout
in place (SCRIPT_JAX_NOTEBOOK_REPO), skips pip (SCRIPT_JAX_NOTEBOOK_SKIP_INSTALL=1: the package is
installed already) and trains a few steps (SCRIPT_JAX_NOTEBOOK_STEPS). No network is touched.
"""

import os
import re
import subprocess

import nbclient
import nbformat
import pytest

from helpers import ROOT

from script_jax import metrics_records

NOTEBOOK = os.path.join(ROOT, "colab", "quickstart.ipynb")
SHORT_STEPS = 60
HOOKS = ("SCRIPT_JAX_NOTEBOOK_REPO", "SCRIPT_JAX_NOTEBOOK_SKIP_INSTALL",
         "SCRIPT_JAX_NOTEBOOK_STEPS")
REPO_LINE = re.compile(r'^REPO_URL = ".*?"', re.M)


def _read():
  return nbformat.read(NOTEBOOK, as_version=nbformat.NO_CONVERT)


def _kernel_env(**hooks):
  """The kernel's environment: the one real CPU device (not conftest's eight fake ones), and
  exactly the short-mode hooks given."""
  env = {k: v for k, v in os.environ.items() if k not in HOOKS}
  env.update(XLA_FLAGS="", JAX_PLATFORMS="cpu", **hooks)
  return env


def _client(nb, cwd):
  return nbclient.NotebookClient(nb, kernel_name="python3", timeout=600,
                                 resources={"metadata": {"path": str(cwd)}})


def _text(cell):
  """Everything a code cell showed: streams, results and error tracebacks."""
  parts = []
  for out in cell.get("outputs", []):
    if out.output_type == "stream":
      parts.append(out.text)
    elif out.output_type in ("execute_result", "display_data"):
      parts.append(out.get("data", {}).get("text/plain", ""))
    elif out.output_type == "error":
      parts.extend(out.traceback)
  return "".join(parts)


def _repo_cell_index(nb):
  return next(i for i, c in enumerate(nb.cells) if c.cell_type == "code"
              and REPO_LINE.search(c.source))


def test_notebook_is_valid_and_clean():
  nb = _read()
  nbformat.validate(nb)
  assert (nb.nbformat, nb.nbformat_minor) >= (4, 5)
  ids = [c.get("id") for c in nb.cells]
  assert all(ids) and len(set(ids)) == len(ids), ids
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(not c.outputs and c.execution_count is None for c in code), "outputs not cleared"
  # One marked place to set the repository, in the first code cell.
  marked = [c for c in code if REPO_LINE.search(c.source) and "<-- set this" in c.source]
  assert len(marked) == 1 and marked[0] is code[0]
  assert nb.metadata.kernelspec.name == "python3"


@pytest.mark.slow
def test_notebook_stops_readably(tmp_path):
  """The repository cell stops "Run all" with a message saying what to fix: REPO_URL empty, or a
  URL git cannot clone; a clonable URL is cloned and becomes the working folder."""
  nb = _read()
  index = _repo_cell_index(nb)
  cell = nb.cells[index]
  source = cell.source
  origin = tmp_path / "origin"
  os.makedirs(origin / "configs")
  (origin / "configs" / "tiny.py").write_text("# stand-in\n")
  git = ["git", "-C", str(origin), "-c", "user.name=t", "-c", "user.email=t@example.com"]
  for args in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "init"]):
    subprocess.run(git + args, check=True, capture_output=True)

  base = tmp_path / "base"
  base.mkdir()
  client = _client(nb, base)
  with client.setup_kernel(env=_kernel_env()):
    cell.source = REPO_LINE.sub('REPO_URL = ""', source)
    with pytest.raises(nbclient.exceptions.CellExecutionError) as stop:
      client.execute_cell(cell, index)
    assert "STOPPED: REPO_URL is empty. Set REPO_URL in the first code cell" in str(stop.value)
    assert "Traceback" not in _text(cell)

    missing = f"file://{tmp_path}/no_such_repo.git"
    cell.source = REPO_LINE.sub(f'REPO_URL = "{missing}"', source)
    with pytest.raises(nbclient.exceptions.CellExecutionError) as stop:
      client.execute_cell(cell, index)
    assert f"STOPPED: git clone {missing} failed" in str(stop.value)
    assert "fatal: " in str(stop.value)  # git's own message comes along
    assert not (base / "script_jax").exists()

    cell.source = REPO_LINE.sub(f'REPO_URL = "file://{origin}"', source)
    client.execute_cell(cell, index)
    assert (base / "script_jax" / "configs" / "tiny.py").is_file()
    probe = nbformat.v4.new_code_cell("print(os.getcwd(), REPO_DIR)")
    client.execute_cell(probe, index + 1)
    assert _text(probe).split() == [str(base / "script_jax")] * 2


@pytest.mark.slow
def test_notebook_runs_in_short_mode(tmp_path):
  nb = _read()
  client = _client(nb, tmp_path)
  client.execute(env=_kernel_env(SCRIPT_JAX_NOTEBOOK_REPO=ROOT,
                                 SCRIPT_JAX_NOTEBOOK_SKIP_INSTALL="1",
                                 SCRIPT_JAX_NOTEBOOK_STEPS=str(SHORT_STEPS)))
  # nbclient raises CellExecutionError on the first failing cell; check what the cells did.
  code = [c for c in nb.cells if c.cell_type == "code"]
  shown = "\n".join(_text(c) for c in code)
  assert "CPU: 1 x cpu" in shown, shown[-3000:]
  assert f"Finished at step {SHORT_STEPS} of {SHORT_STEPS}" in shown
  records = metrics_records.read_records(str(tmp_path / "runs" / "tiny"))
  assert [r["step"] for r in records if "loss" in r] == list(range(10, SHORT_STEPS + 1, 10))
  assert [r["step"] for r in records if "eval_mlm_loss" in r] == [SHORT_STEPS]  # at the end
  # The training curves: one figure, drawn.
  images = [o for c in code for o in c.outputs
            if o.output_type == "display_data" and "image/png" in o.data]
  assert len(images) == 1
  # The scores: one line per sentence with a critic PLL, an MLM PLL and a token count.
  scored = re.findall(r"^ *(-?\d+\.\d{3}) +(-?\d+\.\d{3}) +(\d+)  \S", shown, re.M)
  assert len(scored) == 6 and all(float(c) < 0 and float(m) < 0 for c, m, _ in scored), scored
  assert "LONG_RUN is empty: no long run started" in shown
