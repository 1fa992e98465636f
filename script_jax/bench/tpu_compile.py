"""Does a config fit a TPU slice, and how fast would its step run? Asked of the TPU compiler
itself, on any machine, before paying for the slice (needs only the `tpu` extra: libtpu).

  python -m script_jax.bench.tpu_compile --config=configs/small.py --topology=v3-8
  python -m script_jax.bench.tpu_compile --config=configs/base.py --topology=v3-8 \
      --objectives=script --config.model.dtype=bfloat16 --output=base_v3.json
  python -m script_jax.bench.tpu_compile --config=configs/large.py --topology=v5litepod-256
  python -m script_jax.bench.tpu_compile --config=configs/small.py --topology=v4-8 --step=glue

--topology takes a Cloud TPU accelerator type (v2-8, v3-8, v4-8, v5litepod-8, v5p-8, v6e-8 and
larger slices; v4 and v5p chips are one megacore device each, so a v4-8 has 4 devices) or a
libtpu topology (v3:2x2, v5e:16x16). For each objective the step the trainer jits (--step=train),
the evaluation's (eval) or the fine-tuning trainer's (glue, squad) is traced on abstract arrays
and compiled by libtpu; the command prints and writes (--output, JSON) its per-device memory
against the chip's HBM, FLOPs and bytes accessed, the compiler's estimate of the step's time with
every loop counted by its trip count, the roofline max(FLOPs / peak, bytes / bandwidth) (and the
same with only the bytes to and from HBM: v5e's and v6e's programs keep arrays in on-chip memory,
which the cost analysis counts as bytes accessed), the collectives, and the compile time. A config
that does not fit is a result (fits: false, with the compiler's message). These are the compiler's
estimates, not measurements: no host, no input pipeline, nothing libtpu's performance model does not
price. A compile of small takes 1-4 minutes on two CPU cores.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from absl import app
from absl import flags
from ml_collections import config_flags

from script_jax import cli_errors
from script_jax import config_lib
from script_jax import fs
from script_jax.bench import step_timing
from script_jax.bench import tpu_programs

# Compiling needs no accelerator: leave a TPU on this VM to the run that uses it.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
FLAGS = flags.FLAGS
GIB = 2 ** 30


def define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "A config file (configs/*.py).",
                                  lock_config=True)
  flags.DEFINE_string("topology", "v3-8", "A Cloud TPU accelerator type (v3-8, v4-8, "
                      "v5litepod-8, v5p-8, v6e-8, v4-128, ...) or a libtpu topology (v3:2x2).")
  flags.DEFINE_list("objectives", None, "Objectives to compile (default: the config's "
                    f"objective; any of {','.join(config_lib.OBJECTIVES)}). Not with glue/squad.")
  flags.DEFINE_enum("step", "train", list(tpu_programs.STEPS), "Which step to compile.")
  flags.DEFINE_string("output", None, "Also write the report here as JSON (local or gs://).")
  flags.DEFINE_bool("count_loops", True, "Compile a twin with every scan unrolled for the cost "
                    "of a program with loops (slow at large sizes); off: memory and collectives "
                    "only, no estimate.")
  flags.DEFINE_string("hlo_dir", None, "Write each compiled TPU program's text here.")
  flags.DEFINE_bool("traffic", False, "Also print where each program's bytes go: its largest "
                    "model scopes and ops (bench/hlo_traffic.py; always in the JSON).")
  flags.mark_flags_as_required(["config"])


def _gib(n: float | None) -> str:
  return "-" if n is None else f"{n / GIB:.2f}"


def _scaled(x: float | None, unit: float, digits: int) -> str:
  return "-" if x is None else f"{x / unit:.{digits}f}"


def _rate(x: float | None) -> str:
  return "-" if x is None else f"{x:.1f}"


def format_traffic(result: dict[str, Any]) -> list[str]:
  """Where one program's bytes go: its largest scopes, then its largest ops."""
  traffic = result.get("traffic")
  if not traffic:
    return []
  lines = [f"  bytes by model scope (operands + results of each op, "
           f"{traffic['total_bytes'] / 1e9:.2f} GB in all):"]
  lines += [f"    {s['bytes'] / 1e6:9.1f} MB  {s['ops']:5d} ops  {s['scope']}"
            for s in traffic["by_scope"]]
  lines.append("  largest ops:")
  lines += [f"    {o['bytes'] / 1e6:9.1f} MB  {o['op']} {o['result'][:60]}  {o['op_name'][-80:]}"
            for o in traffic["largest_ops"]]
  return lines


def format_report(report: dict[str, Any], traffic: bool = False) -> str:
  """The reports as a table a person reads, then each one's collectives and notes (and with
  `traffic`, where its bytes go)."""
  rows = report["results"]
  first = rows[0]
  lines = [f"{report['config']} on {first['topology']} ({first['libtpu_topology']}, "
           f"{first['num_devices']} devices of {first['chip']}), step {first['step']}, "
           f"batch {first['batch_size']} x {first['seq_len']}, {first['dtype']}, "
           f"rng {first['rng_impl']}. The compiler's estimates, per device:",
           "",
           "| objective | fits | args GiB | temps GiB | total GiB | HBM GiB | GFLOPs | GB accessed "
           "| estimate steps/s | roofline steps/s | bound | compile s |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
  for r in rows:
    m = r["memory"]
    lines.append(
        f"| {r['objective'] if r['step'] in ('train', 'eval') else r['step']} "
        f"| {'yes' if m['fits'] else 'NO'} | {_gib(m.get('argument_bytes'))} "
        f"| {_gib(m.get('temp_bytes'))} | {_gib(m.get('total_bytes'))} | {_gib(m['hbm_bytes'])} "
        f"| {_scaled(r['flops'], 1e9, 1)} | {_scaled(r['bytes_accessed'], 1e9, 2)} "
        f"| {_rate(r['estimated_steps_per_sec'])} | {_rate(r.get('roofline_steps_per_sec'))} "
        f"| {r.get('roofline_bound') or '-'} | {r['compile_seconds']:.0f} |")
  rates = {r["objective"]: r["estimated_steps_per_sec"] for r in rows}
  if rates.get("script") and rates.get("electra"):
    lines += ["", f"SCRIPT/ELECTRA {rates['script'] / rates['electra']:.3f} by the compiler's "
              f"estimate (the paper, TPU v3-8: {step_timing.PAPER_SCRIPT_OVER_ELECTRA:.3f})."]
  for r in rows:
    lines.append("")
    name = r["objective"] if r["step"] in ("train", "eval") else r["step"]
    if not r["memory"]["fits"]:
      lines.append(f"{name}: does not fit: {r['memory']['compiler_message']}")
      continue
    lines.append(f"{name}: model FLOPs {r['model_flops_per_device'] / 1e9:.1f} G per device; "
                 f"cost from {r['cost_source']}"
                 + (f"; {r['estimate_note']}" if r.get("estimate_note") else "") + ".")
    if r.get("roofline_hbm_steps_per_sec"):
      t = r["traffic"]
      lines.append(f"  bytes by hlo_traffic {t['total_bytes'] / 1e9:.2f} GB, "
                   f"{t['off_hbm_bytes'] / 1e9:.2f} GB of them in on-chip memory; the roofline "
                   f"from the {r['hbm_traffic_bytes'] / 1e9:.2f} GB to and from HBM: "
                   f"{r['roofline_hbm_steps_per_sec']:.1f} steps/s.")
    for c in r["collectives"]:
      shown = ", ".join(c["arrays"][:4]) + (f", ... ({len(c['arrays'])} arrays)"
                                             if len(c["arrays"]) > 4 else "")
      group = "all devices" if c["group_size"] is None else f"groups of {c['group_size']}"
      lines.append(f"  {c['kind']} {c['bytes'] / 2**20:.2f} MiB over {group}: {shown}")
    if traffic:
      lines += format_traffic(r)
  return "\n".join(lines)


def run(config, topology: str, objectives: list[str] | None, step: str,
        config_path: str = "", count_loops: bool = True,
        hlo_dir: str | None = None) -> dict[str, Any]:
  """Compiles each objective's step for `topology`; returns {"config", "results": [...]}."""
  tpu = tpu_programs.parse_slice(topology)
  devices = tpu_programs.tpu_devices(tpu)
  if step in ("glue", "squad"):
    if objectives:
      raise config_lib.ConfigError(f"--objectives does not apply to --step={step}: fine-tuning "
                                   "trains the encoder alone.")
    objectives = [config.objective]
  for name in objectives or []:
    if name not in config_lib.OBJECTIVES:
      raise config_lib.ConfigError(f"--objectives: unknown {name!r}; use any of "
                                   f"{','.join(config_lib.OBJECTIVES)}.")
  if hlo_dir:
    fs.makedirs(hlo_dir)
  results = []
  for objective in objectives or [config.objective]:
    print(f"{objective}: compiling the {step} step for {tpu.name} ...", file=sys.stderr)
    settings = step_timing.with_settings(config, objective)
    results.append(tpu_programs.compile_step(
        settings, tpu, step, devices,
        log=lambda line, o=objective: print(f"{o}: {line}", file=sys.stderr),
        count_loops=count_loops,
        hlo_path=fs.join(hlo_dir, f"{objective}_{step}.hlo.txt") if hlo_dir else None))
  return {"config": config_path, "results": results}


def main(argv):
  def body():
    # libtpu's options as the trainer sets them (main.py), before libtpu is loaded.
    os.environ["LIBTPU_INIT_ARGS"] = config_lib.libtpu_init_args(
        FLAGS.config, os.environ.get("LIBTPU_INIT_ARGS", ""))
    report = run(FLAGS.config, FLAGS.topology, FLAGS.objectives, FLAGS.step,
                 config_path=config_flags.get_config_filename(FLAGS["config"]),
                 count_loops=FLAGS.count_loops, hlo_dir=FLAGS.hlo_dir)
    print(format_report(report, traffic=FLAGS.traffic))
    if FLAGS.output:
      fs.write_atomically(FLAGS.output, json.dumps(report, indent=2))
  cli_errors.run_cli(argv, body)


if __name__ == "__main__":
  define_flags()
  app.run(main)
