"""The FLOPs count against a hand count and the traced program; the benchmark runs end to end.

No timing is asserted: benchmarks print figures, tests check that the figures are computed.
"""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ROOT, load_config, run_module, shared_workdir, tiny_pretraining_flags

from script_jax.bench import step_timing
from script_jax.data import synthetic
from script_jax.bench import flops
from script_jax import models
from script_jax import objectives
from script_jax import sharding as sharding_lib
from script_jax import train

# configs/tiny.py pinned to the sizes this hand count is written for (E != H, so both encoders
# project): V 2048, E 32, H 64, F 256, L 2, 2 heads, T 64, P = int(0.155 * 64) = 9;
# generator H 16, F 64, L 2. Batch B = 2, so B*T = 128 tokens and B*P = 18 predictions.
PINNED = {"model.vocab_size": 2048, "model.embedding_size": 32, "model.hidden_size": 64,
          "model.intermediate_size": 256, "model.num_layers": 2, "model.num_heads": 2,
          "seq_len": 64, "mask.max_predictions_per_seq": 9, "electra.generator_hidden_size": 16,
          "electra.generator_intermediate_size": 64, "electra.generator_num_layers": 2,
          "electra.generator_num_heads": 1}
TINY_ENCODER = {  # one discriminator-sized pass
    "embeddings_project": 2 * 128 * 32 * 64,
    "attention_qkv": 2 * 3 * (2 * 128 * 64 * 64),
    "attention_output": 2 * (2 * 128 * 64 * 64),
    "attention_scores": 2 * (2 * 128 * 64 * 64),  # 2 layers x 2*(B*T)*T*H
    "attention_values": 2 * (2 * 128 * 64 * 64),
    "ffn": 2 * 2 * (2 * 128 * 64 * 256),
}
TINY_GENERATOR = {
    "embeddings_project": 2 * 128 * 32 * 16,
    "attention_qkv": 2 * 3 * (2 * 128 * 16 * 16),
    "attention_output": 2 * (2 * 128 * 16 * 16),
    "attention_scores": 2 * (2 * 128 * 64 * 16),
    "attention_values": 2 * (2 * 128 * 64 * 16),
    "ffn": 2 * 2 * (2 * 128 * 16 * 64),
}


def _hand_count(objective):
  """The forward FLOPs of tiny at batch 2, written out term by term."""
  enc = sum(TINY_ENCODER.values())  # 29,884,416
  mlm_pass = enc + 2 * 18 * 64 * 32 + 2 * 18 * 32 * 2048  # head dense and logits at B*P
  if objective == "mlm":
    return mlm_pass
  if objective == "script":
    critic_pass = enc + 2 * 128 * 64 * 32 + 2 * 128 * 32 * 2048  # head and logits at all B*T
    return mlm_pass + critic_pass
  generator = sum(TINY_GENERATOR.values()) + 2 * 18 * 16 * 32 + 2 * 18 * 32 * 2048
  discriminator = enc + 2 * 128 * 64 * 64 + 2 * 128 * 64 * 1  # dense H->H and H->1 heads
  return generator + discriminator


@pytest.mark.parametrize("objective", ["script", "electra", "mlm"])
def test_flops_match_a_hand_count_on_tiny(objective):
  config = load_config("tiny", objective=objective, **PINNED)
  counted = flops.train_step_flops(config, batch_size=2)
  assert counted["forward"] == _hand_count(objective)
  assert counted["backward"] == 2 * _hand_count(objective)  # every pass gets gradients
  assert counted["total"] == 3 * _hand_count(objective)
  encoder_part = {k.split("/")[1]: v for k, v in counted["by_component"].items()
                  if k.startswith(("mlm_pass/", "discriminator/")) and k.split("/")[1]
                  in TINY_ENCODER}
  assert encoder_part == TINY_ENCODER


def test_flops_literal_totals():
  # The sums of _hand_count, by hand: a second guard against an error in both places.
  assert _hand_count("mlm") == 32_317_440
  assert _hand_count("script") == 79_503_360
  assert _hand_count("electra") == 36_079_616


def test_softmax_bias_grad_flops_by_hand():
  # 2 * rows * V with V = 2048, B = 2, P = 9, T = 64: the MLM logits at 18 rows, SCRIPT's critic
  # at 128 more (or at the 18 masked ones).
  config = load_config("tiny", **PINNED)
  assert flops.softmax_bias_grad_flops(config, "mlm", 2) == 2 * 18 * 2048
  assert flops.softmax_bias_grad_flops(config, "electra", 2) == 2 * 18 * 2048
  assert flops.softmax_bias_grad_flops(config, "script", 2) == 2 * (18 + 128) * 2048
  masked = load_config("tiny", **PINNED, **{"script.disc_positions": "masked"})
  assert flops.softmax_bias_grad_flops(masked, "script", 2) == 2 * 36 * 2048


def test_flops_scale_with_batch_and_default_to_the_config():
  config = load_config("tiny", batch_size=6, **PINNED)
  assert flops.train_step_flops(config)["total"] == 3 * flops.train_step_flops(
      config, batch_size=2)["total"]
  with pytest.raises(ValueError, match="Unknown objective"):
    flops.train_step_flops(config, objective="gan")


def _traced_loss_flops(config, batch_size=2):
  model = models.build_model(config)
  batch = {k: jnp.asarray(v) for k, v in
           synthetic.random_masked_batch(config, batch_size, seed=1).items()}
  params = jax.eval_shape(lambda r: model.init(
      r, batch["input_ids"], batch["segment_ids"], batch["input_mask"],
      batch["masked_positions"]), jax.random.key(0))["params"]
  loss_fn = functools.partial(objectives.get_objective(config.objective), model=model,
                              config=config)
  loss = lambda p: loss_fn(p, batch, jax.random.key(1))[0]
  return (flops.traced_matmul_flops(loss, params),
          flops.traced_matmul_flops(jax.value_and_grad(loss), params))


@pytest.mark.parametrize("objective,override", [
    ("script", {}), ("electra", {}), ("mlm", {}),
    ("script", {"script.disc_positions": "masked"}),
    ("electra", {"model.scan_layers": True}),
])
def test_analytic_count_equals_the_matmuls_of_the_traced_step(objective, override):
  config = load_config("tiny", objective=objective, **PINNED, **override)
  forward, with_grad = _traced_loss_flops(config)
  counted = flops.train_step_flops(config, batch_size=2)
  assert forward == counted["forward"]
  # The backward also runs the softmax bias gradients as matrix-vector products.
  assert with_grad == counted["total"] + flops.softmax_bias_grad_flops(config, batch_size=2)


def test_rematerialisation_is_executed_but_not_model_flops():
  # The chunked critic logsumexp recomputes its logits in the backward pass: one more
  # forward of critic_pass/logits is executed, the model FLOPs stay the same.
  config = load_config("tiny", objective="script", **PINNED, **{"script.logsumexp_chunk": 32})
  _, with_grad = _traced_loss_flops(config)
  counted = flops.train_step_flops(config, batch_size=2)
  assert with_grad == (counted["total"] + counted["by_component"]["critic_pass/logits"]
                       + flops.softmax_bias_grad_flops(config, batch_size=2))


def test_random_batch_is_a_valid_masked_batch():
  config = load_config("tiny")
  batch = synthetic.random_masked_batch(config, 3, seed=0)
  assert batch["masked_positions"].shape == (3, config.mask.max_predictions_per_seq)
  for row in batch["masked_positions"]:
    assert len(set(row.tolist())) == len(row) and row.min() >= 1
    assert row.max() < config.seq_len - 1
  assert (batch["masked_ids"] >= 5).all()
  assert set(train.BATCH_KEYS) == set(batch)


def _run_benchmark_cli(args, timeout=300):
  # The one real CPU device; LLVM's optimisation off compiles faster (no timing is asserted).
  env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0", JAX_PLATFORMS="cpu")
  # A one-layer tiny model keeps compilation short; the code paths are the real ones.
  small = ["--config=configs/tiny.py", "--config.model.num_layers=1",
           "--config.electra.generator_num_layers=1", "--batch_size=4"]
  return subprocess.run([sys.executable, "-m", "script_jax.bench.step_speed", *small, *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_benchmark_runs_end_to_end_and_writes_json(tmp_path):
  out = tmp_path / "bench.json"
  proc = _run_benchmark_cli(["--steps=2", "--warmup=1", "--repeats=2", "--peak_size=128",
                             "--peak_iters=2", f"--output={out}"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.read_text())
  for key in ("date", "device_kind", "platform", "num_devices", "cpu_count", "versions",
              "settings", "matmul_peak", "results", "script_over_electra",
              "paper_script_over_electra", "config", "command"):
    assert key in report, key
  assert {"jax", "flax", "optax"} <= set(report["versions"])
  assert report["settings"]["batch_size"] == 4 and report["settings"]["steps"] == 2
  assert report["paper_script_over_electra"] == pytest.approx(22.7 / 31.3)
  peak = report["matmul_peak"]
  assert peak["flops_per_sec"] == max(peak["all_flops_per_sec"]) > 0  # before and after
  assert len(peak["all_flops_per_sec"]) == 2
  assert list(report["results"]) == ["script", "electra", "mlm"]
  config = load_config("tiny", **{"model.num_layers": 1, "electra.generator_num_layers": 1})
  for objective, r in report["results"].items():
    assert r["steps_per_sec"] == pytest.approx(2 / min(r["window_seconds"]))
    assert len(r["window_seconds"]) == len(r["others_cpu_share"]) == 2
    assert r["tokens_per_sec"] == pytest.approx(r["steps_per_sec"] * 4 * 64)
    assert r["model_flops_per_step"] == flops.train_step_flops(config, objective, 4)["total"]
    assert r["executed_matmul_flops_per_step"] == (  # no remat here; the bias mat-vecs
        r["model_flops_per_step"] + flops.softmax_bias_grad_flops(config, objective, 4))
    assert r["utilisation"] == pytest.approx(
        r["model_flops_per_sec"] / report["matmul_peak"]["flops_per_sec"])
    assert r["memory"]["temp_size_in_bytes"] > 0 and r["memory"]["argument_size_in_bytes"] > 0
    assert r["compile_s"] > 0
  assert report["script_over_electra"] == pytest.approx(
      report["results"]["script"]["steps_per_sec"] / report["results"]["electra"]["steps_per_sec"])
  assert "SCRIPT/ELECTRA steps/s" in proc.stdout and "util %" in proc.stdout
  assert "others %" in proc.stdout
  assert "[script] compiled in" in proc.stdout  # progress lines


@pytest.mark.slow
def test_memory_only_compiles_and_reports_memory():
  one_layer = dict(PINNED, **{"model.num_layers": 1})
  config = load_config("tiny", **one_layer)
  lines = []
  run = functools.partial(step_timing.run_benchmark, objectives=["script"], batch_size=8,
                          memory_only=True, devices=jax.devices()[:1], log=lines.append,
                          compiler_options={"xla_backend_optimization_level": 0})
  report = run(config)
  assert report["settings"]["memory_only"] and "matmul_peak" not in report
  result = report["results"]["script"]
  assert "steps_per_sec" not in result
  assert result["memory"]["temp_size_in_bytes"] > 0
  assert result["model_flops_per_step"] == flops.train_step_flops(config, "script", 8)["total"]
  table = step_timing.format_table(report)
  assert "temp MiB" in table and "steps/s" not in table
  assert any("[script] compiled in" in line for line in lines)
  # The figure follows the setting it is there to check: chunking the critic's logsumexp
  # (B*T = 512 rows of V = 2048 logits) in chunks of 64 rows shrinks the temporaries.
  chunked = run(load_config("tiny", **one_layer, **{"script.logsumexp_chunk": 64}))
  assert (chunked["results"]["script"]["memory"]["temp_size_in_bytes"]
          < result["memory"]["temp_size_in_bytes"])


@pytest.mark.slow
def test_steps_per_call_runs_that_many_real_steps_and_states_are_reused():
  """A call of steps_per_call=3 advances the optimizer 3 steps; a second run reuses the state."""
  config = load_config("tiny", **dict(PINNED, **{"model.num_layers": 1}))
  states, lines = {}, []
  mesh = sharding_lib.create_mesh(config, jax.devices()[:1])
  run = functools.partial(step_timing.benchmark_objective, config, "mlm", batch_size=8,
                          mesh=mesh, states=states,
                          compiler_options={"xla_backend_optimization_level": 0},
                          log=lines.append)
  result = run(steps=6, warmup=3, repeats=2, steps_per_call=3)
  assert result["steps_per_call"] == 3 and result["steps_per_sec"] > 0
  # FLOPs stay per step: the scanned program's matmuls over its 3 steps.
  assert result["executed_matmul_flops_per_step"] == flops.train_step_flops(
      config, "mlm", 8)["total"] + flops.softmax_bias_grad_flops(config, "mlm", 8)
  state, _ = states["mlm"]
  assert int(state.step) == 3 + 2 * 6  # warm-up and both windows, 3 steps per call
  run(steps=2, warmup=1, repeats=1)
  assert int(states["mlm"][0].step) == 15 + 1 + 2
  assert sum("state initialised" in line for line in lines) == 1
  assert sum("state reused" in line for line in lines) == 1
  with pytest.raises(ValueError, match="multiple of steps_per_call"):
    run(steps=5, steps_per_call=3)


def test_trace_summary_counts_device_streams_and_xla_ops(tmp_path):
  """A GPU-shaped perfetto trace with fresh random spans against a direct count."""
  import gzip  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng()
  meta = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
          {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}}]
  threads = {(1, 10): "python", (2, 20): "Stream #13(Compute)", (2, 21): "Stream #14(Copy)",
             (2, 30): "XLA Ops", (2, 31): "XLA Modules"}
  meta += [{"ph": "M", "pid": p, "tid": t, "name": "thread_name", "args": {"name": n}}
           for (p, t), n in threads.items()]
  spans, want = [], {}
  for (pid, tid), thread_name in threads.items():
    for _ in range(int(rng.integers(5, 30))):
      name = f"{rng.choice(['gemm', 'loop_fusion', 'reduce'])}.{rng.integers(0, 99)}"
      dur = float(rng.uniform(1, 500))
      spans.append({"ph": "X", "pid": pid, "tid": tid, "name": name, "dur": dur,
                    "ts": float(rng.uniform(0, 1e5))})
      view = ("kernels" if thread_name.startswith("Stream") else
              "xla_ops" if thread_name == "XLA Ops" else None)
      if view:
        want.setdefault(view, {}).setdefault(name.split(".")[0], 0.0)
        want[view][name.split(".")[0]] += dur
  path = tmp_path / "perfetto_trace.json.gz"
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": meta + spans}, f)
  steps = int(rng.integers(1, 6))
  summary = step_timing.summarise_trace(str(path), steps=steps)
  for view in ("kernels", "xla_ops"):
    got = {r["name"]: r["ms_per_step"] for r in summary[view]["top"]}
    assert got == pytest.approx({k: v / 1e3 / steps for k, v in want[view].items()})
    assert summary[view]["busy_ms_per_step"] == pytest.approx(
        sum(want[view].values()) / 1e3 / steps)
    shares = [r["share"] for r in summary[view]["top"]]
    assert sum(shares) == pytest.approx(1.0) and shares == sorted(shares, reverse=True)
  assert summary["kernels"]["timelines"] == ["Stream #13(Compute)", "Stream #14(Copy)"]
  assert "kernels:" in step_timing.format_profile(summary)


@pytest.mark.slow
def test_benchmark_profiles_through_the_cli(tmp_path):
  out = tmp_path / "bench.json"
  proc = _run_benchmark_cli(["--objectives=mlm", "--steps=2", "--warmup=1", "--peak_size=64",
                             "--peak_iters=1", f"--profile_dir={tmp_path / 'prof'}",
                             "--profile_steps=2", f"--output={out}"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  profile = json.loads(out.read_text())["results"]["mlm"]["profile"]
  assert profile["steps"] == 2 and profile["kernels"]["busy_ms_per_step"] > 0
  assert profile["kernels"]["top"] and os.path.isdir(profile["trace_dir"])
  assert "[mlm] profile of 2 steps" in proc.stdout


@pytest.mark.slow
def test_gpu_check_script_runs_every_variant_on_cpu(tmp_path):
  """script_jax/bench/gpu_check.sh end to end on the CPU with tiny settings: every variant of
  script_jax/bench/variants.py is timed in one process, each objective's state initialised once, and
  the JSON and table name them all (no GPU needed; nvidia-smi may be missing)."""
  from script_jax.bench import variants  # pylint: disable=import-outside-toplevel
  env = dict(os.environ, OUT=str(tmp_path), CONFIG="configs/tiny.py", BATCH="8", STEPS="2",
             PYTHON=sys.executable, JAX_PLATFORMS="cpu", BUDGET="1000",
             XLA_FLAGS="--xla_backend_optimization_level=0")
  proc = subprocess.run(["bash", "script_jax/bench/gpu_check.sh"], cwd=ROOT, capture_output=True,
                        text=True, timeout=600, env=env)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  report = json.loads((tmp_path / "variants.json").read_text())
  assert report["settings"]["dtype"] == "bfloat16"
  rows = report["variants"]
  assert [row["name"] for row in rows] == [v[0] for v in variants.VARIANTS]
  for row, (name, objective, _, _, per_call) in zip(rows, variants.VARIANTS):
    assert row["objective"] == objective and row.get("steps_per_sec", 0) > 0, row
    assert row["steps_per_call"] == per_call and row["steps"] % per_call == 0, row
    assert name in proc.stdout
  assert "SCRIPT/ELECTRA as configured: " in proc.stdout and "util %" in proc.stdout
  log = (tmp_path / "variants.log").read_text()
  for objective in ("script", "electra"):
    assert log.count(f"[{objective}] state initialised") == 1
    assert f"[{objective}] state reused" in log


@pytest.mark.slow
def test_resume_benchmark_times_both_orders_and_writes_json(tmp_path_factory, tmp_path):
  workdir = shared_workdir(tmp_path_factory, "script")
  with open(os.path.join(workdir, "run_config.json")) as f:
    source = json.load(f)["data"]["source"]
  output = tmp_path / "resume_data.json"
  result = run_module("bench.resume_data", [
      *tiny_pretraining_flags(source), f"--data_dir={workdir}/data", "--fractions=0.2,0.8",
      f"--output={output}"])
  assert result.returncode == 0, result.stderr.decode()[-3000:]
  figures = json.loads(output.read_text())
  assert [r["fraction"] for r in figures["rows"]] == [0.2, 0.8]
  assert figures["rows"][1]["start_step"] > figures["rows"][0]["start_step"] > 0
  assert all(r["buffer_seconds"] > 0 and r["windows_seconds"] > 0 for r in figures["rows"])
  assert "| 80% of an epoch |" in result.stdout.decode()
  bad = run_module("bench.resume_data", [*tiny_pretraining_flags(source),
                                         f"--data_dir={workdir}/data", "--fractions=1.5"])
  assert bad.returncode == 2 and b"error: --fractions must lie in [0, 1)" in bad.stderr
  one = run_module("bench.resume_data", [*tiny_pretraining_flags(source),
                                         f"--data_dir={workdir}/data", "--fractions=0.5",
                                         "--orders=windows"])
  assert one.returncode == 0, one.stderr.decode()[-3000:]
  assert "| resume at | step | windows (s) |" in one.stdout.decode()
  assert "buffer" not in one.stdout.decode().split("| resume at")[1]
  bad = run_module("bench.resume_data", [*tiny_pretraining_flags(source),
                                         f"--data_dir={workdir}/data", "--orders=random"])
  assert bad.returncode == 2 and b"error: --orders takes buffer, windows: random" in bad.stderr
