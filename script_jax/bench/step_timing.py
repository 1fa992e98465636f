"""Timing SCRIPT, ELECTRA and BERT-MLM train steps under identical settings: the sharded state,
the real compiled step, the timed windows, the matmul peak, XLA's memory analysis, profiles and
the machine's description. The library behind `python -m script_jax.bench.step_speed` (whose
docstring says how it measures), reused by variants.py, hf_training.py and finetune_speed.py.
"""

from __future__ import annotations

import copy
import datetime
import gzip
import json
import math
import os
import platform
import re
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax

from script_jax import config_lib
from script_jax import fs
from script_jax import models
from script_jax import sharding as sharding_lib
from script_jax import state as state_lib
from script_jax import train
from script_jax.bench import flops
from script_jax.data import synthetic

PAPER_STEPS_PER_SEC = {"electra": 31.3, "script": 22.7}  # TPU v3-8, small models (Sec. 3.3)
PAPER_SCRIPT_OVER_ELECTRA = PAPER_STEPS_PER_SEC["script"] / PAPER_STEPS_PER_SEC["electra"]
MIB = 2 ** 20


def _print(message: str) -> None:
  print(message, flush=True)


# ----------------------------------------------------------------------------- inputs

def with_settings(config, objective: str, batch_size: int | None = None):
  """A copy of `config` for one objective (and batch size), the rest untouched."""
  config = copy.deepcopy(config)
  with config.unlocked():
    config.objective = objective
    if batch_size is not None:
      config.batch_size = batch_size
  return config


# ----------------------------------------------------------------------------- the machine

class CpuShare:
  """The share of the machine's CPUs that other processes used during a window (Linux).

  On a shared machine this says how far a window's figures can be trusted: 0 is a quiet
  machine, 0.5 means others kept half of the cores busy. None where /proc/stat is missing.
  """

  def __init__(self):
    self._start = self._snapshot()

  @staticmethod
  def _snapshot():
    try:
      with open("/proc/stat") as f:
        jiffies = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
      return None
    busy = (sum(jiffies) - jiffies[3] - jiffies[4]) / os.sysconf("SC_CLK_TCK")
    own = sum(os.times()[:2])  # this process's user + system seconds
    return busy, own, time.perf_counter()

  def others(self) -> float | None:
    end = self._snapshot()
    if self._start is None or end is None:
      return None
    busy, own, wall = (e - s for e, s in zip(end, self._start))
    return max(0.0, (busy - own) / max(wall * (os.cpu_count() or 1), 1e-9))


def warm_up_torch(step: Callable[[], Any], warmup: int, label: str) -> float:
  """Runs a PyTorch step `warmup` times and returns its last loss (nan with none); a loss that
  is not finite after warm-up is an error, not a timing."""
  loss = math.nan
  for _ in range(warmup):
    loss = float(step().detach())
  if warmup and not math.isfinite(loss):
    raise FloatingPointError(f"{label} loss is {loss} after warm-up")
  return loss


def timed_windows(run_window: Callable[[], Any], repeats: int,
                  report: Callable[[float, float], None]) -> tuple[list[float], list[float]]:
  """Times `repeats` calls of `run_window` (one window's steps, finished before it returns):
  each window's seconds and the share of the CPUs other processes used in it (`CpuShare`),
  each passed to `report(seconds, others)` as the window ends."""
  windows, others = [], []
  for _ in range(repeats):
    share = CpuShare()
    start = time.perf_counter()
    run_window()
    windows.append(time.perf_counter() - start)
    others.append(share.others())
    report(windows[-1], others[-1])
  return windows, others


def percent(share: float | None) -> str:
  """A CpuShare figure for tables: "12" (per cent) or "?" where it is unknown."""
  return "?" if share is None else f"{100 * share:.0f}"


# ----------------------------------------------------------------------------- the peak

def measure_matmul_peak(mesh, size: int = 2048, iters: int = 10, dtype: str = "float32",
                        windows: int = 2) -> dict[str, Any]:
  """FLOP/s of chained n x n x n jitted matmuls, one per device (the same devices as the step).

  Each device multiplies its own [n, n] block (sharded over every device of `mesh`), so the
  figure is the aggregate peak the train step could reach. Best of `windows` windows.
  """
  devices = mesh.devices.reshape(-1)
  flat = jax.sharding.Mesh(devices, ("d",))
  sharding = jax.sharding.NamedSharding(flat, jax.sharding.PartitionSpec("d"))
  d = len(devices)
  key_a, key_b = jax.random.split(jax.random.key(0))
  a = jax.device_put(jax.random.normal(key_a, (d, size, size), dtype), sharding)
  # Scaled so a chain of products stays O(1) and never overflows.
  b = jax.device_put(jax.random.normal(key_b, (d, size, size), dtype) / math.sqrt(size), sharding)
  matmul = jax.jit(lambda x, y: jnp.einsum("dij,djk->dik", x, y), out_shardings=sharding)
  jax.block_until_ready(matmul(a, b))  # compile and warm up
  best, others = math.inf, None
  for _ in range(windows):
    share = CpuShare()
    start = time.perf_counter()
    x = a
    for _ in range(iters):
      x = matmul(x, b)
    jax.block_until_ready(x)
    seconds = time.perf_counter() - start
    if seconds < best:
      best, others = seconds, share.others()
  flop = iters * d * 2 * size ** 3
  return {"flops_per_sec": flop / best, "size": size, "iters": iters, "dtype": dtype,
          "num_devices": d, "seconds": best, "others_cpu_share": others}


# ----------------------------------------------------------------------------- one objective

def peak_settings(mesh, size: int | None = None, iters: int | None = None) -> tuple[int, int]:
  """(n, chained matmuls) of the peak measurement: 2048^3 x 10 on CPU; 8192^3 x 20 on
  accelerators, which 2048^3 products do not fill. Given values are kept."""
  on_cpu = mesh.devices.flat[0].platform == "cpu"
  return size or (2048 if on_cpu else 8192), iters or (10 if on_cpu else 20)


def _memory(compiled) -> dict[str, int]:
  stats = compiled.memory_analysis()
  if stats is None:
    return {}
  names = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
           "alias_size_in_bytes", "generated_code_size_in_bytes", "peak_memory_in_bytes")
  return {n: int(getattr(stats, n)) for n in names if hasattr(stats, n)}


def _xla_flops(compiled) -> float | None:
  """XLA's own count (all ops, per device); None where the backend gives none."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def benchmark_objective(config, objective: str, *, batch_size: int | None = None, steps: int = 20,
                        warmup: int = 3, repeats: int = 1, memory_only: bool = False,
                        mesh=None, compiler_options: dict[str, Any] | None = None,
                        profile_dir: str | None = None, profile_steps: int = 5,
                        steps_per_call: int = 1, states: dict[str, Any] | None = None,
                        log: Callable[[str], None] = _print) -> dict[str, Any]:
  """Compiles and times `objective`'s real train step; returns its figures (see module doc).

  `steps_per_call` > 1 compiles that many train steps into one call (a `lax.scan` over the
  step, like TF's iterations_per_loop): one dispatch per call instead of per step. `states`,
  a dict, keeps each objective's train state between calls, so variants that leave the
  parameters' shapes alone (compiler options, fused_qkv, steps_per_call) skip the
  initialisation.

  With `profile_dir`, `profile_steps` more steps run under jax.profiler (outside the timed
  windows) and the result holds the trace's op summary (`summarise_trace`).

  `compiler_options` go to XLA's compile; e.g. {"xla_backend_optimization_level": 0} compiles
  faster on CPU (slower code, the same buffers: memory figures are unchanged).
  """
  config = with_settings(config, objective, batch_size)
  mesh = sharding_lib.create_mesh(config) if mesh is None else mesh
  config_lib.validate_config(config, num_devices=mesh.devices.size)
  b, t = config.batch_size, config.seq_len
  model = models.build_model(config)

  if steps % steps_per_call:
    raise ValueError(f"steps ({steps}) must be a multiple of steps_per_call ({steps_per_call})")
  start = time.perf_counter()
  reused = states is not None and objective in states and not memory_only
  if reused:
    state, state_sharding = states.pop(objective)
  elif memory_only:
    # Compiling needs only shapes: trace the sharded init abstractly (nothing is allocated).
    shardings = []

    def init():
      state, state_sharding = state_lib.init_state(config, model, mesh)
      shardings.append(state_sharding)
      return state
    state = jax.eval_shape(init)
    state_sharding = shardings[0]
  else:
    state, state_sharding = state_lib.init_state(config, model, mesh)
    jax.block_until_ready(state)
  num_params = int(sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)))
  log(f"[{objective}] state {'traced' if memory_only else 'reused' if reused else 'initialised'} "
      f"({num_params:,} parameters) in {time.perf_counter() - start:.1f} s")

  local = b // jax.process_count()
  batch = train.to_global_batch(
      synthetic.random_masked_batch(config, local, seed=jax.process_index()), mesh)
  train_step = train.make_train_step(config, model, state_sharding, mesh)
  if steps_per_call > 1:
    one_step = train_step

    def several_steps(state, batch):
      state, metrics = jax.lax.scan(lambda s, _: one_step(s, batch), state, None,
                                    length=steps_per_call)
      return state, jax.tree.map(lambda m: m[-1], metrics)
    train_step = jax.jit(several_steps, donate_argnums=0)
  start = time.perf_counter()
  traced = train_step.trace(state, batch)
  compiled = traced.lower().compile(compiler_options=compiler_options)
  compile_s = time.perf_counter() - start
  memory = _memory(compiled)
  model_flops = flops.train_step_flops(config)
  result = {
      "objective": objective, "batch_size": b, "seq_len": t, "num_params": num_params,
      "compile_s": compile_s, "memory": memory,
      "model_flops_per_step": model_flops["total"],
      "model_flops_forward": model_flops["forward"],
      # What the traced program multiplies: above the model FLOPs when it rematerialises.
      "executed_matmul_flops_per_step": (flops.jaxpr_matmul_flops(traced.jaxpr.jaxpr)
                                         // steps_per_call),
      "xla_flops_per_step_per_device": _xla_flops(compiled),
  }
  if steps_per_call > 1 and result["xla_flops_per_step_per_device"] is not None:
    result["xla_flops_per_step_per_device"] /= steps_per_call  # the analysis is per call
  log(f"[{objective}] compiled in {compile_s:.1f} s; temp "
      f"{memory.get('temp_size_in_bytes', 0) / MIB:.1f} MiB")
  if memory_only:
    return result

  for _ in range(math.ceil(warmup / steps_per_call)):
    state, metrics = compiled(state, batch)
  if warmup:
    loss = float(metrics["loss"])  # the one host sync, outside the timed windows
    if not math.isfinite(loss):
      raise FloatingPointError(f"[{objective}] loss is {loss} after warm-up")
    result["loss_after_warmup"] = loss
  jax.block_until_ready(state)
  log(f"[{objective}] warmed up ({warmup} steps); timing {repeats} x {steps} steps")

  windows, others = [], []
  for _ in range(repeats):
    share = CpuShare()
    start = time.perf_counter()
    for _ in range(steps // steps_per_call):
      state, _ = compiled(state, batch)
    jax.block_until_ready(state)
    windows.append(time.perf_counter() - start)
    others.append(share.others())
    log(f"[{objective}] {steps} steps in {windows[-1]:.3f} s ({steps / windows[-1]:.3f} "
        f"steps/s; other processes used {percent(others[-1])}% of the CPUs)")
  best = int(np.argmin(windows))
  steps_per_sec = steps / windows[best]
  result.update(
      steps=steps, warmup=warmup, steps_per_call=steps_per_call, window_seconds=windows,
      others_cpu_share=others, others_cpu_share_best_window=others[best],
      steps_per_sec=steps_per_sec, tokens_per_sec=steps_per_sec * b * t,
      model_flops_per_sec=steps_per_sec * model_flops["total"])
  if profile_dir:
    trace_dir = fs.join(profile_dir, objective)
    calls = math.ceil(profile_steps / steps_per_call)
    profile_steps = calls * steps_per_call
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(calls):
        state, _ = compiled(state, batch)
      jax.block_until_ready(state)
    summary = summarise_trace(find_perfetto_trace(trace_dir), steps=profile_steps)
    result["profile"] = dict(summary, trace_dir=trace_dir)
    log(f"[{objective}] profile of {profile_steps} steps in {trace_dir}:\n"
        + format_profile(summary))
  if states is not None:
    states[objective] = (state, state_sharding)
  return result


# ----------------------------------------------------------------------------- profiles

def find_perfetto_trace(trace_dir: str) -> str:
  """The newest perfetto_trace.json.gz that jax.profiler wrote under `trace_dir`."""
  found = [fs.join(root, name) for root, _, names in fs.walk(trace_dir) for name in names
           if name.endswith("perfetto_trace.json.gz")]
  if not found:
    raise FileNotFoundError(f"jax.profiler wrote no perfetto_trace.json.gz under {trace_dir}")
  return max(found, key=fs.getmtime)


def summarise_trace(path: str, steps: int, top: int = 20) -> dict[str, Any]:
  """Time per name on a perfetto trace's timelines, in ms per step.

  "kernels": the device streams (GPU "Stream #..." threads, else every device timeline but the
  XLA summary rows) or, on a CPU run, XLA's own host threads; "xla_ops": the device's "XLA Ops"
  row (HLO op names), where there is one. Trailing ".N" clone suffixes are dropped from names
  (fusion.12 and fusion.13 are both "fusion").
  """
  with fs.open(path, "rb") as raw, gzip.GzipFile(fileobj=raw) as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  process = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
  thread = {(e["pid"], e.get("tid")): e.get("args", {}).get("name", "") for e in events
            if e.get("ph") == "M" and e.get("name") == "thread_name"}
  device = {(p, t): n for (p, t), n in thread.items() if process.get(p, "").startswith("/device:")}
  summary_rows = ("XLA Modules", "XLA Ops", "Steps", "Launch Stats", "TensorFlow Ops")
  if device:
    kernels = {k for k, n in device.items() if n.startswith("Stream")} or {
        k for k, n in device.items() if n not in summary_rows}
    ops = {k for k, n in device.items() if n == "XLA Ops"}
  else:
    kernels, ops = {k for k, n in thread.items() if n.startswith("tf_XLA")}, set()

  def table(rows):
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e
             and (e["pid"], e.get("tid")) in rows]
    per_name: dict[str, list[float]] = {}
    for e in spans:
      total = per_name.setdefault(re.sub(r"(\.\d+)+$", "", e["name"]), [0.0, 0])
      total[0] += float(e["dur"])
      total[1] += 1
    busy_us = sum(v[0] for v in per_name.values())
    first = min((float(e["ts"]) for e in spans), default=0.0)
    last = max((float(e["ts"]) + float(e["dur"]) for e in spans), default=0.0)
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:top]
    return {"timelines": sorted({thread[k] for k in rows}), "per_step": len(spans) / steps,
            "busy_ms_per_step": busy_us / 1e3 / steps,
            "span_ms_per_step": (last - first) / 1e3 / steps,
            "top": [{"name": k, "ms_per_step": v[0] / 1e3 / steps,
                     "count_per_step": v[1] / steps, "share": v[0] / busy_us if busy_us else 0.0}
                    for k, v in ranked]}

  result = {"steps": steps, "kernels": table(kernels)}
  if ops:
    result["xla_ops"] = table(ops)
  return result


def format_profile(summary: dict[str, Any]) -> str:
  lines = []
  for view in ("kernels", "xla_ops"):
    if view not in summary:
      continue
    t = summary[view]
    lines += [f"  {view}: {t['per_step']:.0f} per step, busy {t['busy_ms_per_step']:.2f} ms of a "
              f"{t['span_ms_per_step']:.2f} ms span per step ({len(t['timelines'])} timelines)",
              f"  {'ms/step':>8} {'share':>6} {'n/step':>7}  name"]
    lines += [f"  {r['ms_per_step']:>8.3f} {100 * r['share']:>5.1f}% {r['count_per_step']:>7.1f}  "
              f"{r['name'][:90]}" for r in t["top"]]
  return "\n".join(lines)


# ----------------------------------------------------------------------------- the whole run

def environment() -> dict[str, Any]:
  """Where and with what the figures were measured."""
  cpu_model = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      cpu_model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")),
                       cpu_model)
  except OSError:
    pass
  device = jax.devices()[0]
  return {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "platform": device.platform, "device_kind": device.device_kind,
      "num_devices": jax.device_count(), "process_count": jax.process_count(),
      "cpu_count": os.cpu_count(), "cpu_model": cpu_model,
      "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
      "versions": {"python": platform.python_version(), "jax": jax.__version__,
                   "jaxlib": jaxlib.__version__, "flax": flax.__version__,
                   "optax": optax.__version__, "numpy": np.__version__},
  }


def run_benchmark(config, objectives=config_lib.OBJECTIVES, *, batch_size: int | None = None,
                  steps: int = 20, warmup: int = 3, repeats: int = 1, memory_only: bool = False,
                  peak_size: int | None = None, peak_iters: int | None = None, devices=None,
                  compiler_options: dict[str, Any] | None = None,
                  profile_dir: str | None = None, profile_steps: int = 5,
                  steps_per_call: int = 1,
                  log: Callable[[str], None] = _print) -> dict[str, Any]:
  """Every objective under the same settings, plus the matmul peak: the JSON report.

  `devices` (default: all) are the devices of the mesh; memory figures are per device.
  """
  for name in objectives:
    if name not in config_lib.OBJECTIVES:
      raise ValueError(f"Unknown objective {name!r}; choose from {config_lib.OBJECTIVES}")
  mesh = sharding_lib.create_mesh(config, devices)
  report = environment()
  report["num_devices"] = int(mesh.devices.size)
  b = config.batch_size if batch_size is None else batch_size
  report["settings"] = {
      "objectives": list(objectives), "batch_size": b, "seq_len": config.seq_len,
      "max_predictions_per_seq": config.mask.max_predictions_per_seq,
      "dtype": config.model.dtype, "remat": config.model.remat,
      "logsumexp_chunk": config.script.logsumexp_chunk, "steps": steps, "warmup": warmup,
      "repeats": repeats, "steps_per_call": steps_per_call, "memory_only": memory_only,
      "mesh": dict(mesh.shape),
      "compiler_options": compiler_options or {},
      "xla_flags": os.environ.get("XLA_FLAGS", "")}
  log(f"Benchmark on {report['num_devices']} x {report['device_kind']} ({report['cpu_count']} "
      f"CPUs, load {report['load_average']}): batch {b} x {config.seq_len}, "
      f"{config.model.dtype}")

  peak_size, peak_iters = peak_settings(mesh, peak_size, peak_iters)

  def peak(when):
    log(f"Measuring the matmul peak {when} ({peak_size}^3, {config.model.dtype}) ...")
    measured = measure_matmul_peak(mesh, peak_size, peak_iters, config.model.dtype)
    log(f"Matmul peak {when}: {measured['flops_per_sec'] / 1e9:.1f} GFLOP/s")
    return measured

  peaks = [] if memory_only else [peak("before")]
  results = {}
  for name in objectives:
    results[name] = benchmark_objective(
        config, name, batch_size=batch_size, steps=steps, warmup=warmup, repeats=repeats,
        memory_only=memory_only, mesh=mesh, compiler_options=compiler_options,
        profile_dir=profile_dir, profile_steps=profile_steps, steps_per_call=steps_per_call,
        log=log)
  if not memory_only:
    # Before and after the steps; the higher one is the peak (a conservative utilisation).
    peaks.append(peak("after"))
    report["matmul_peak"] = dict(max(peaks, key=lambda p: p["flops_per_sec"]),
                                 all_flops_per_sec=[p["flops_per_sec"] for p in peaks])
    for r in results.values():
      r["utilisation"] = r["model_flops_per_sec"] / report["matmul_peak"]["flops_per_sec"]
  report["results"] = results
  if not memory_only and "script" in results and "electra" in results:
    report["script_over_electra"] = (results["script"]["steps_per_sec"]
                                     / results["electra"]["steps_per_sec"])
  report["paper_script_over_electra"] = PAPER_SCRIPT_OVER_ELECTRA
  report["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
  report["config"] = config.to_dict()
  return report


def format_table(report: dict[str, Any]) -> str:
  """The human-readable summary of `run_benchmark`'s report."""
  mem_cols = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
              "alias_size_in_bytes")
  memory_only = report["settings"]["memory_only"]
  head = f"{'objective':<9} {'compile s':>9} "
  if not memory_only:
    head += (f"{'steps/s':>8} {'tokens/s':>9} {'GFLOP/step':>10} {'GFLOP/s':>8} "
             f"{'util %':>6} {'others %':>8} ")
  head += f"{'temp MiB':>9} {'args MiB':>9} {'out MiB':>8} {'alias MiB':>9}"
  lines = [head]
  for name, r in report["results"].items():
    line = f"{name:<9} {r['compile_s']:>9.1f} "
    if not memory_only:
      line += (f"{r['steps_per_sec']:>8.3f} {r['tokens_per_sec']:>9.0f} "
               f"{r['model_flops_per_step'] / 1e9:>10.2f} {r['model_flops_per_sec'] / 1e9:>8.1f} "
               f"{100 * r['utilisation']:>6.1f} {percent(r['others_cpu_share_best_window']):>8} ")
    line += " ".join(f"{r['memory'].get(c, 0) / MIB:>{w}.1f}"
                     for c, w in zip(mem_cols, (9, 9, 8, 9)))
    lines.append(line)
  if "matmul_peak" in report:
    p = report["matmul_peak"]
    lines.append(f"matmul peak: {p['flops_per_sec'] / 1e9:.1f} GFLOP/s "
                 f"({p['size']}^3 {p['dtype']} on {p['num_devices']} device(s); best of "
                 f"{', '.join(f'{x / 1e9:.1f}' for x in p['all_flops_per_sec'])} before/after)")
  if not memory_only:
    lines.append("others %: CPU share other processes used during the reported window")
  if "script_over_electra" in report:
    lines.append(f"SCRIPT/ELECTRA steps/s: {report['script_over_electra']:.3f} "
                 f"(paper, TPU v3-8: 22.7/31.3 = {report['paper_script_over_electra']:.3f})")
  return "\n".join(lines)
