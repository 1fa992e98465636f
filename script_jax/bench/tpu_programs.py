"""A config's step compiled by the real TPU compiler (libtpu) on a machine without a TPU.

libtpu describes any slice (`jax.experimental.topologies.get_topology_desc`); jit over a mesh of
its devices, traced on abstract arrays (nothing is allocated), then `.lower().compile()` gives
the TPU program: its per-device memory (`memory_analysis`), its collectives, and XLA's cost
analysis (FLOPs, bytes accessed and, where libtpu's performance model has one, its estimate of
the step's seconds, `optimal_seconds`).

The cost analysis counts a while loop's body once. A program with loops (scanned layers, the
chunked critic logsumexp) is therefore also compiled as a twin whose every `scan` is fully
unrolled (`unrolled_scans`), for its cost alone; memory and collectives come from the real
program. An estimate whose FLOPs fall below the model's (bench/flops.py) is not reported.

The cost analysis's bytes accessed include reads and writes of the core's on-chip memory where
the compiler keeps arrays there (v5e, v6e: memory space S(1)); `roofline_hbm_seconds` prices
only what hlo_traffic finds moved to or from HBM.

These are the compiler's estimates, not measurements: they leave out the host, the input
pipeline and whatever libtpu's model does not price (it prices a custom kernel only by the cost
the kernel declares).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import glob
import math
import os
import re
import time
from typing import Any, Callable

# Several processes (pytest-xdist workers, a run beside a benchmark) may each load libtpu to
# compile; it refuses a second loader without this.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def _tpu_attached() -> bool:
  """Whether this machine has TPU chips (their device files)."""
  return bool(glob.glob("/dev/accel*")) or os.path.exists("/dev/vfio")


if not _tpu_attached():
  # No TPU here: libtpu would look for a TPU VM's metadata and print a page of warnings. These
  # only describe the missing host; the topology compiled for is the one asked for.
  for _name, _value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                        ("TPU_ACCELERATOR_TYPE", "v3-8")):
    os.environ.setdefault(_name, _value)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.extend.core as jex  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.experimental import topologies  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from script_jax import cli_errors  # pylint: disable=g-import-not-at-top,wrong-import-position
from script_jax import config_lib  # pylint: disable=wrong-import-position
from script_jax import evaluation  # pylint: disable=wrong-import-position
from script_jax import fs  # pylint: disable=wrong-import-position
from script_jax import models  # pylint: disable=wrong-import-position
from script_jax import sharding as sharding_lib  # pylint: disable=wrong-import-position
from script_jax import state as state_lib  # pylint: disable=wrong-import-position
from script_jax import train  # pylint: disable=wrong-import-position
from script_jax.bench import flops as flops_lib  # pylint: disable=wrong-import-position
from script_jax.bench import hlo_collectives  # pylint: disable=wrong-import-position
from script_jax.bench import hlo_traffic  # pylint: disable=wrong-import-position
from script_jax.finetune import glue_runs  # pylint: disable=wrong-import-position
from script_jax.finetune import model as task_models  # pylint: disable=wrong-import-position
from script_jax.finetune import optim  # pylint: disable=wrong-import-position
from script_jax.finetune import squad_runs  # pylint: disable=wrong-import-position
from script_jax.finetune import trainer  # pylint: disable=wrong-import-position

P = jax.sharding.PartitionSpec
GIB = 2 ** 30
STEPS = ("train", "eval", "glue", "squad")


class TopologyError(cli_errors.UserError):
  """A slice name neither Cloud TPU nor libtpu knows."""


# ----------------------------------------------------------------------------- the chips

@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU chip's figures, per chip, from `source`."""
  version: str
  peak_bf16_flops: float      # FLOP/s
  hbm_bytes: int
  hbm_bytes_per_sec: float
  devices_per_chip: int       # JAX devices a chip shows: one per TensorCore on v2/v3
  cores_per_chip: int         # what a Cloud TPU name's number counts on v2, v3, v4, v5p
  source: str

  @property
  def named_by_cores(self) -> bool:
    """Whether "vX-N" counts TensorCores (v2-v5p) rather than chips (v5e, v6e)."""
    return self.version in ("v2", "v3", "v4", "v5p")


CHIPS = {
    "v2": Chip("v2", 46e12, 16 * GIB, 700e9, 2, 2,
               "Jouppi et al. 2020, 'A Domain-Specific Supercomputer for Training Deep Neural "
               "Networks' (CACM 63(7)), Table 3; cloud.google.com/tpu/docs/v2 links it"),
    "v3": Chip("v3", 123e12, 32 * GIB, 900e9, 2, 2, "cloud.google.com/tpu/docs/v3"),
    "v4": Chip("v4", 275e12, 32 * GIB, 1200e9, 1, 2, "cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("v5e", 197e12, 16 * GIB, 819e9, 1, 1, "cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("v5p", 459e12, 95 * GIB, 2765e9, 1, 2, "cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("v6e", 918e12, 32 * GIB, 1640e9, 1, 1, "cloud.google.com/tpu/docs/v6e"),
}
_CLOUD_VERSION = {"v2": "v2", "v3": "v3", "v4": "v4", "v5litepod": "v5e", "v5e": "v5e",
                  "v5p": "v5p", "v6e": "v6e"}


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU slice: its name as given, its chip, libtpu's topology name and its size."""
  name: str
  chip: Chip
  topology: str               # libtpu's, e.g. "v3:2x2"
  num_chips: int

  @property
  def num_devices(self) -> int:
    return self.num_chips * self.chip.devices_per_chip

  @property
  def hbm_bytes_per_device(self) -> int:
    return self.chip.hbm_bytes // self.chip.devices_per_chip


def chip_grid(version: str, num_chips: int) -> tuple[int, ...]:
  """The chips' torus of a Cloud TPU slice: 2D for v2, v3, v5e, v6e (v3-8 2x2, v5e-256
  16x16), 3D for v4 and v5p (v4-8 2x2x1, v4-128 4x4x4), doubling the smallest dimension."""
  dims = [1, 1] if version in ("v2", "v3", "v5e", "v6e") else [2, 2, 1]
  if math.prod(dims) > num_chips:  # v4/v5p below 4 chips
    dims = [num_chips, 1, 1] if num_chips <= 2 else dims
  while math.prod(dims) < num_chips:
    smallest = min(dims)
    dims[len(dims) - 1 - dims[::-1].index(smallest)] *= 2
  return tuple(dims)


def parse_slice(name: str) -> Slice:
  """A Cloud TPU accelerator type ("v3-8", "v4-128", "v5litepod-256", "v5p-8", "v6e-8") or a
  libtpu topology ("v3:2x2", "v4:4x4x4", "v5e:16x16") as a Slice."""
  cloud = re.fullmatch(r"(v2|v3|v4|v5litepod|v5e|v5p|v6e)-(\d+)", name.strip())
  libtpu = re.fullmatch(r"(v2|v3|v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})", name.strip())
  if cloud:
    chip = CHIPS[_CLOUD_VERSION[cloud.group(1)]]
    count = int(cloud.group(2))
    per = chip.cores_per_chip if chip.named_by_cores else 1
    num_chips = count // per
    if count % per or num_chips < 1 or num_chips & (num_chips - 1):
      raise TopologyError(f"{name}: a {chip.version} slice counts "
                          f"{'TensorCores, 2 per chip' if per == 2 else 'chips'}; use a "
                          f"power of two (e.g. {chip.version if chip.version != 'v5e' else 'v5litepod'}"
                          f"-{8 if per == 2 else 8}).")
    grid = chip_grid(chip.version, num_chips)
    return Slice(name, chip, f"{chip.version}:{'x'.join(map(str, grid))}", num_chips)
  if libtpu:
    chip = CHIPS[libtpu.group(1)]
    grid = tuple(int(d) for d in libtpu.group(2).split("x"))
    return Slice(name, chip, name.strip(), math.prod(grid))
  raise TopologyError(
      f"--topology={name}: use a Cloud TPU accelerator type (v2-8, v3-8, v4-8, v5litepod-8, "
      "v5p-8, v6e-8, or a larger slice such as v4-128 or v5litepod-256) or a libtpu topology "
      "(v3:2x2, v4:2x2x1, v5e:16x16).")


def tpu_devices(tpu: Slice) -> list[Any]:
  """The slice's devices as libtpu describes them (no TPU needed): a v4 chip is one megacore
  device, as on a real v4 VM."""
  options: dict[str, Any] = {}
  if tpu.chip.version == "v4":
    options["chip_config_name"] = "megacore"
  if tpu.num_chips < 4:  # a host-sized slice smaller than a host: one host of these chips
    grid = [int(d) for d in tpu.topology.split(":")[1].split("x")]
    options["chips_per_host_bounds"] = tuple(grid + [1] * (3 - len(grid)))
  try:
    description = topologies.get_topology_desc(platform="tpu", topology_name=tpu.topology,
                                               **options)
  except (RuntimeError, ValueError) as e:
    raise TopologyError(f"libtpu does not describe {tpu.topology} ({tpu.name}): "
                        f"{' '.join(str(e).split())[:300]}") from e
  return list(description.devices)


# ----------------------------------------------------------------------------- the steps

def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def _abstract_batch(arrays: dict[str, np.ndarray], sharding) -> dict[str, jax.ShapeDtypeStruct]:
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding) for k, v in arrays.items()}


def for_tpu(config):
  """A copy of `config` with config.rng_impl as the trainer resolves it on a TPU ("auto": rbg
  without remat), since the trainer here would resolve it for the CPU."""
  config = copy.deepcopy(config)
  with config.unlocked():
    config.rng_impl = config_lib.resolve_rng_impl(config.rng_impl, "tpu", config.model.remat)
  return config


def pretraining_program(config, mesh, step: str):
  """(jitted step, abstract arguments, model FLOPs of the whole step) of the trainer's train
  step (`train.make_train_step`) or the evaluation's (`evaluation.make_eval_step`)."""
  model = models.build_model(config)
  abstract_state = jax.eval_shape(functools.partial(state_lib.create_train_state, config, model),
                                  jax.random.key(config.seed))
  state_sharding = sharding_lib.state_shardings(config, abstract_state, mesh)
  batch_sharding = jax.sharding.NamedSharding(mesh, sharding_lib.batch_spec(mesh))
  if step == "train":
    batch = _abstract_batch(state_lib.dummy_batch(config, config.batch_size), batch_sharding)
    fn = train.make_train_step(config, model, state_sharding, mesh)
    model_flops = flops_lib.train_step_flops(config, config.objective)["total"]
    return fn, (_abstract(abstract_state, state_sharding), batch), model_flops
  batch_size = config.batch_size  # the Evaluator's batches
  batch = _abstract_batch(state_lib.dummy_batch(config, batch_size), batch_sharding)
  fn = evaluation.make_eval_step(config, model, state_sharding.params, mesh)
  number = jax.ShapeDtypeStruct((), np.int32,
                                sharding=jax.sharding.NamedSharding(mesh, P()))
  model_flops = sum(flops_lib.forward_flops(config, config.objective, batch_size).values())
  return fn, (_abstract(abstract_state.params, state_sharding.params), batch, number), model_flops


def finetuning_program(config, mesh, step: str):
  """(jitted step, abstract arguments, model FLOPs) of the fine-tuning trainer's step
  (`finetune.trainer.make_train_step`) for GLUE (a classifier) or SQuAD (ELECTRA's span head),
  with the defaults of configs/finetune.py and this config's encoder."""
  ft = config_lib.finetune_config()
  cfg = models.encoder_config_from(config.model, dropout_rate=ft.dropout_rate,
                                   attention_dropout_rate=ft.attention_dropout_rate)
  length = ft.max_length if step == "glue" else min(ft.squad.max_length,
                                                    cfg.max_position_embeddings)
  b = ft.batch_size
  batch = {"input_ids": np.zeros((b, length), np.int32),
           "segment_ids": np.zeros((b, length), np.int32),
           "input_mask": np.ones((b, length), np.int32),
           "example_weight": np.ones((b,), np.float32)}
  if step == "glue":
    model = task_models.Classifier(cfg, 2)
    loss_fn = glue_runs.classification_loss
    batch["labels"] = np.zeros((b,), np.int32)
  else:
    model = task_models.JointSpanExtractor(cfg)
    loss_fn = functools.partial(squad_runs.span_loss, no_answer_weight=ft.squad.no_answer_weight,
                                version="2.0")
    batch.update(context_mask=np.ones((b, length), np.int32),
                 start_positions=np.zeros((b,), np.int32), end_positions=np.zeros((b,), np.int32),
                 is_impossible=np.zeros((b,), np.float32))
  extra = {k: batch[k] for k in getattr(model, "predict_inputs", ())}
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), batch["input_ids"],
                                             batch["segment_ids"], batch["input_mask"],
                                             **extra)["params"])
  tx, schedule = optim.make_optimizer(ft, params, cfg.num_layers, 1000)
  replicated = jax.sharding.NamedSharding(mesh, P())
  opt_state = jax.eval_shape(tx.init, params)
  fn = trainer.make_train_step(model, loss_fn, tx, schedule, ft.loss_reduction, 0, replicated)
  data = jax.sharding.NamedSharding(mesh, P("data"))
  args = (_abstract(params, jax.tree.map(lambda _: replicated, params)),
          _abstract(opt_state, jax.tree.map(lambda _: replicated, opt_state)),
          _abstract_batch(batch, data), jax.ShapeDtypeStruct((), np.int32, sharding=replicated))
  encoder = flops_lib.encoder_forward_flops(b, length, cfg.embedding_size, cfg.hidden_size,
                                            cfg.num_layers, cfg.intermediate_size)
  return fn, args, (1 + flops_lib.BACKWARD_FACTOR) * sum(encoder.values())


# ----------------------------------------------------------------------------- loops counted

def _unroll_params(params: dict[str, Any], unroll: Callable) -> dict[str, Any]:
  out = {}
  for key, value in params.items():
    if isinstance(value, jex.ClosedJaxpr):
      value = jex.ClosedJaxpr(unroll(value.jaxpr), value.consts)
    elif isinstance(value, jex.Jaxpr):
      value = unroll(value)
    elif isinstance(value, tuple) and value and all(isinstance(v, jex.ClosedJaxpr)
                                                     for v in value):
      value = tuple(jex.ClosedJaxpr(unroll(v.jaxpr), v.consts) for v in value)
    out[key] = value
  return out


def unrolled_scans(jaxpr: jex.Jaxpr) -> jex.Jaxpr:
  """`jaxpr` with every `scan`, at any depth, fully unrolled (unroll = its length): the same
  computation with no while loop, so XLA's cost analysis counts each iteration."""
  eqns = []
  for eqn in jaxpr.eqns:
    params = _unroll_params(eqn.params, unrolled_scans)
    if eqn.primitive.name == "scan":
      params["unroll"] = params["length"]
    eqns.append(eqn.replace(params=params))
  return jaxpr.replace(eqns=eqns)


def unrolled_twin(jitted, args) -> Any:
  """The lowered twin of `jitted(*args)` with its scans unrolled, jitted with the same
  shardings and donations (for its cost analysis)."""
  closed = jax.make_jaxpr(jitted)(*args)
  (call,) = closed.jaxpr.eqns  # the one jit call
  inner = call.params["jaxpr"]
  body = jex.ClosedJaxpr(unrolled_scans(inner.jaxpr), inner.consts)
  donated = tuple(i for i, d in enumerate(call.params["donated_invars"]) if d)
  run_body = jex.jaxpr_as_fun(body)
  twin = jax.jit(lambda *flat: tuple(run_body(*flat)), in_shardings=call.params["in_shardings"],
                 out_shardings=call.params["out_shardings"], donate_argnums=donated)
  flat_args = jax.tree.leaves(args)
  return twin.trace(*flat_args).lower()


def while_loops(hlo: str) -> int:
  """How many while loops a compiled program's text has."""
  return len(re.findall(r"[)}\]] while\(", hlo))  # "%w = (f32[..]{..:T(8,128)}, ..) while("


# ----------------------------------------------------------------------------- the report

def _cost(compiled) -> dict[str, float]:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return dict(cost or {})


def _memory(compiled, tpu: Slice) -> dict[str, Any]:
  stats = compiled.memory_analysis()
  argument, output = int(stats.argument_size_in_bytes), int(stats.output_size_in_bytes)
  alias, temp = int(stats.alias_size_in_bytes), int(stats.temp_size_in_bytes)
  total = argument + output - alias + temp  # donated arguments are the outputs' buffers
  return {"argument_bytes": argument, "output_bytes": output, "alias_bytes": alias,
          "temp_bytes": temp, "total_bytes": total, "hbm_bytes": tpu.hbm_bytes_per_device,
          "fits": True}


def _out_of_memory(error: Exception) -> str | None:
  text = " ".join(str(error).split())
  if "Ran out of memory" in text or "RESOURCE_EXHAUSTED" in text:
    found = re.search(r"Ran out of memory in memory space \w+\.?.*?(?:exceeds|\.)[^.]*\.", text)
    return (found.group(0) if found else text)[:500]
  return None


def compile_step(config, tpu: Slice, step: str = "train", devices=None,
                 log: Callable[[str], None] = lambda _: None, count_loops: bool = True,
                 hlo_path: str | None = None) -> dict[str, Any]:
  """Compiles `config`'s `step` ("train", "eval", "glue", "squad") for `tpu` and returns the
  report (module docstring): memory against the chip's HBM, FLOPs and bytes accessed, the
  compiler's estimate with loops counted, the roofline, the collectives, the compile time.

  count_loops=False skips the unrolled twin of a program with loops (its compile can take far
  longer than the program's): its cost is then the raw one and no estimate is given. hlo_path:
  where to write the compiled program's text."""
  if step not in STEPS:
    raise TopologyError(f"--step={step}: use one of {', '.join(STEPS)}.")
  config = for_tpu(config)
  devices = tpu_devices(tpu) if devices is None else devices
  config_lib.validate_config(config, num_devices=len(devices), process_count=1, num_slices=1)
  if step in ("train", "eval"):
    mesh = sharding_lib.create_mesh(config, devices)
    jitted, args, model_flops = pretraining_program(config, mesh, step)
  else:
    mesh = sharding_lib.make_mesh((len(devices),), ("data",), devices)
    jitted, args, model_flops = finetuning_program(config, mesh, step)
  report: dict[str, Any] = {
      "topology": tpu.name, "libtpu_topology": tpu.topology, "chip": tpu.chip.version,
      "num_devices": len(devices), "step": step, "objective": config.objective,
      "dtype": config.model.dtype, "rng_impl": config.rng_impl,
      "batch_size": config.batch_size, "seq_len": config.seq_len,
      "model_flops_per_device": model_flops / len(devices)}
  began = time.perf_counter()
  try:
    lowered = jitted.trace(*args).lower()
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    message = _out_of_memory(e)
    if message is None:
      raise
    report.update(compile_seconds=time.perf_counter() - began,
                  memory={"fits": False, "hbm_bytes": tpu.hbm_bytes_per_device,
                          "compiler_message": message},
                  flops=None, bytes_accessed=None, estimated_seconds=None,
                  estimated_steps_per_sec=None, roofline_seconds=None, collectives=[])
    return report
  report["compile_seconds"] = time.perf_counter() - began
  log(f"compiled in {report['compile_seconds']:.0f} s")
  hlo = compiled.as_text()
  report["memory"] = _memory(compiled, tpu)
  report["collectives"] = hlo_collectives.summary(hlo)
  report["traffic"] = hlo_traffic.summary(hlo)
  report["while_loops"] = while_loops(hlo)
  cost = _cost(compiled)
  report["cost_source"] = "program"
  if hlo_path:
    fs.write_atomically(hlo_path, hlo)
  if report["while_loops"] and not count_loops:
    report["cost_source"] = "the program, its loops counted once"
    report.update(_estimates(cost, report["model_flops_per_device"], tpu))
    report.update(estimated_seconds=None, estimated_steps_per_sec=None, roofline_seconds=None,
                  roofline_steps_per_sec=None, roofline_bound=None,
                  estimate_note="no estimate: --nocount_loops")
    return report
  if report["while_loops"]:
    began = time.perf_counter()
    twin = unrolled_twin(jitted, args).compile()
    report["twin_compile_seconds"] = time.perf_counter() - began
    log(f"the twin with unrolled scans compiled in {report['twin_compile_seconds']:.0f} s")
    left = while_loops(twin.as_text())
    cost = _cost(twin) if not left else {}
    report["cost_source"] = ("the twin with every scan unrolled" if not left else
                             f"none: {left} while loops are left after unrolling the scans")
  report.update(_estimates(cost, report["model_flops_per_device"], tpu))
  if not report["while_loops"] and report.get("roofline_seconds"):
    report.update(_hbm_roofline(report, tpu))
  return report


def _device_rates(tpu: Slice) -> tuple[float, float]:
  """One device's peak bfloat16 FLOP/s and HBM bytes/s (a megacore chip's are split)."""
  return (tpu.chip.peak_bf16_flops / tpu.chip.devices_per_chip,
          tpu.chip.hbm_bytes_per_sec / tpu.chip.devices_per_chip)


def _hbm_roofline(report: dict[str, Any], tpu: Slice) -> dict[str, Any]:
  """The roofline with only the bytes that go to or from HBM by hlo_traffic: v5e's and v6e's
  compilers keep weights and activations in the core's on-chip memory (S(1)) between ops, and
  the cost analysis counts those reads and writes as bytes accessed all the same, priced at HBM
  bandwidth by `roofline_seconds` (docs/benchmarks.md 7.12). A program with loops has no such
  figure (its traffic counts a loop's body once)."""
  traffic = report["traffic"]
  hbm_bytes = traffic["total_bytes"] - traffic["off_hbm_bytes"]
  peak, bandwidth = _device_rates(tpu)
  seconds = max(report["flops"] / peak, hbm_bytes / bandwidth)
  return {"hbm_traffic_bytes": hbm_bytes, "roofline_hbm_seconds": seconds,
          "roofline_hbm_steps_per_sec": 1 / seconds}


def _estimates(cost: dict[str, float], model_flops: float, tpu: Slice) -> dict[str, Any]:
  """FLOPs, bytes, the compiler's estimate and the roofline, per device; no estimate where
  the program's FLOPs fall below the model's."""
  flops, bytes_accessed = cost.get("flops"), cost.get("bytes accessed")
  seconds = cost.get("optimal_seconds")
  peak, bandwidth = _device_rates(tpu)
  out: dict[str, Any] = {"flops": flops, "bytes_accessed": bytes_accessed,
                         "estimated_seconds": None, "estimated_steps_per_sec": None,
                         "roofline_seconds": None, "estimate_note": None}
  if flops is None or bytes_accessed is None:
    out["estimate_note"] = "the compiler gave no cost analysis"
    return out
  if flops < model_flops:
    out["estimate_note"] = (f"refused: the program's {flops:.3g} FLOPs per device are below "
                            f"the model's {model_flops:.3g} (a loop counted once?)")
    return out
  out["roofline_seconds"] = max(flops / peak, bytes_accessed / bandwidth)
  out["roofline_steps_per_sec"] = 1 / out["roofline_seconds"]
  out["roofline_bound"] = "FLOPs" if flops / peak >= bytes_accessed / bandwidth else "bytes"
  if seconds is not None and seconds > 0:
    out["estimated_seconds"] = float(seconds)
    out["estimated_steps_per_sec"] = 1 / float(seconds)
  else:
    out["estimate_note"] = ("the compiler's performance model gave no estimate"
                            " (optimal_seconds absent or negative)")
  return out
