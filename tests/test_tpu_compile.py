"""The steps compiled by the real TPU compiler (libtpu, the `test` extra) for TPU slices, on the
CPU: which collectives the TPU program has and in which dtype, loops counted by their trip count,
memory and the compiler's estimate, and the `script_jax.bench.tpu_compile` command."""

import json
import re
import subprocess
import sys

from helpers import ROOT, load_config
import pytest

from script_jax.bench import tpu_programs

V3_8 = tpu_programs.parse_slice("v3-8")


@pytest.fixture(scope="module")
def v3_devices():
  return tpu_programs.tpu_devices(V3_8)  # fails, not skips, where libtpu cannot be loaded


def _tiny(objective, dtype="bfloat16", **overrides):
  overrides.setdefault("rng_impl", "threefry2x32")  # the cost model prices no rbg bits
  return load_config("tiny", objective=objective, **{"model.dtype": dtype}, **overrides)


def _assert_planned(report):
  """Fits; every collective an all-reduce over all 8 devices in float32 (gradients, metrics):
  a bfloat16 all-reduce sums gradients at 8 bits of mantissa. The evaluation step also gathers
  its per-token outputs (the host needs them all): all-gathers of [devices, rows, ...]."""
  assert report["memory"]["fits"]
  assert report["collectives"]
  for c in report["collectives"]:
    if report["step"] == "eval" and c["kind"] == "all-gather":
      dims = [[int(d) for d in re.findall(r"\d+", a.split("[")[1])] for a in c["arrays"]]
      assert all(d[0] * d[1] == report["batch_size"] for d in dims), c
      continue
    assert c["kind"] == "all-reduce", c
    assert c["group_size"] == 8, c
    assert all(a.startswith("f32[") for a in c["arrays"]), c


@pytest.mark.parametrize("name, topology, devices", [
    ("v3-8", "v3:2x2", 8), ("v2-8", "v2:2x2", 8), ("v4-8", "v4:2x2x1", 4),
    ("v4-128", "v4:4x4x4", 64), ("v5p-8", "v5p:2x2x1", 4), ("v5litepod-8", "v5e:2x4", 8),
    ("v5litepod-256", "v5e:16x16", 256), ("v6e-8", "v6e:2x4", 8), ("v5e:1x1", "v5e:1x1", 1)])
def test_cloud_names_become_libtpu_topologies_with_megacore_counted(name, topology, devices):
  tpu = tpu_programs.parse_slice(name)
  assert tpu.topology == topology
  assert tpu.num_devices == devices
  assert len(tpu_programs.tpu_devices(tpu)) == devices


@pytest.mark.parametrize("name", ["v3-6", "v7-8", "v4-7", "tpu"])
def test_unknown_slices_are_user_errors(name):
  with pytest.raises(tpu_programs.TopologyError):
    tpu_programs.parse_slice(name)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["electra", "mlm"])
def test_bfloat16_train_steps_reduce_gradients_in_float32(objective, v3_devices):
  report = tpu_programs.compile_step(_tiny(objective), V3_8, "train", v3_devices)
  _assert_planned(report)
  assert report["flops"] >= report["model_flops_per_device"]
  assert report["estimated_steps_per_sec"] > 0
  assert report["roofline_seconds"] <= report["estimated_seconds"] * 1.5
  # Where the bytes go, op by op, adds up to about the cost analysis's count; the layers'
  # forward and backward passes are among the largest scopes.
  traffic = report["traffic"]
  assert 0.75 < traffic["total_bytes"] / report["bytes_accessed"] < 1.25
  scopes = [s["scope"] for s in traffic["by_scope"]]
  assert any(s.startswith("backward/") and "/layer_*" in s for s in scopes), scopes
  assert any(s.startswith("forward/") and "/layer_*" in s for s in scopes), scopes


@pytest.mark.slow
def test_eval_and_glue_steps_compile_with_only_float32_all_reduces(v3_devices):
  for step in ("eval", "glue"):
    report = tpu_programs.compile_step(_tiny("script"), V3_8, step, v3_devices)
    _assert_planned(report)
    assert report["flops"] >= report["model_flops_per_device"], step


@pytest.mark.slow
def test_a_loops_cost_is_counted_by_its_trip_count(v3_devices):
  """The cost analysis counts a while loop's body once; the twin with the scan unrolled counts
  all 16 matmuls (16 x 2 x 512^3 FLOPs per device)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  mesh = jax.sharding.Mesh(np.array(v3_devices), ("data",))
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

  def chain(x_Dx512x512, w_16x512x512):
    return jax.lax.scan(lambda x, w: (jnp.tanh(x @ w), None), x_Dx512x512, w_16x512x512)[0]

  jitted = jax.jit(chain, in_shardings=(split, None), out_shardings=split)
  args = (jax.ShapeDtypeStruct((8, 512, 512), jnp.float32, sharding=split),
          jax.ShapeDtypeStruct((16, 512, 512), jnp.float32,
                               sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())))
  program = jitted.trace(*args).lower().compile()
  twin = tpu_programs.unrolled_twin(jitted, args).compile()
  matmuls = 16 * 2 * 512 ** 3
  assert tpu_programs.while_loops(program.as_text()) == 1
  assert tpu_programs.while_loops(twin.as_text()) == 0
  assert tpu_programs._cost(program)["flops"] < matmuls / 8
  assert tpu_programs._cost(twin)["flops"] == pytest.approx(matmuls, rel=0.01)


@pytest.mark.slow
def test_scanned_and_unscanned_layers_cost_the_same(v3_devices):
  reports = {scan: tpu_programs.compile_step(_tiny("mlm", "float32", **{
      "model.scan_layers": scan}), V3_8, "train", v3_devices) for scan in (False, True)}
  assert reports[True]["flops"] == pytest.approx(reports[False]["flops"], rel=0.02)
  assert reports[True]["bytes_accessed"] == pytest.approx(reports[False]["bytes_accessed"],
                                                          rel=0.25)


def test_estimate_refused_below_the_model_flops():
  out = tpu_programs._estimates({"flops": 1e9, "bytes accessed": 1e9, "optimal_seconds": 1e-3},
                                model_flops=2e9, tpu=V3_8)
  assert out["estimated_seconds"] is None and "refused" in out["estimate_note"]
  out = tpu_programs._estimates({"flops": 3e9, "bytes accessed": 9e8, "optimal_seconds": 1e-3},
                                model_flops=2e9, tpu=V3_8)
  # v3: a device is one core, half a chip: 61.5 TFLOP/s and 450 GB/s.
  assert out["roofline_seconds"] == pytest.approx(max(3e9 / 61.5e12, 9e8 / 450e9))
  assert out["estimated_steps_per_sec"] == pytest.approx(1000)


@pytest.mark.slow
def test_command_writes_the_report_and_a_config_that_does_not_fit_is_a_result(tmp_path):
  """Through the command: SCRIPT in bfloat16 on a v3-8 (JSON keys a script reads), then a
  batch no v5e chip holds: fits false with the compiler's message, exit 0."""
  output = tmp_path / "report.json"
  base = [sys.executable, "-m", "script_jax.bench.tpu_compile", "--config=configs/tiny.py",
          "--config.rng_impl=threefry2x32", "--config.model.dtype=bfloat16"]
  done = subprocess.run(base + ["--topology=v3-8", f"--output={output}"], capture_output=True,
                        text=True, timeout=600, cwd=ROOT)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "| script | yes |" in done.stdout
  (result,) = json.loads(output.read_text())["results"]
  for key in ("argument_bytes", "output_bytes", "temp_bytes", "total_bytes", "hbm_bytes", "fits"):
    assert key in result["memory"]
  for key in ("flops", "bytes_accessed", "estimated_seconds", "estimated_steps_per_sec",
              "roofline_seconds", "collectives", "compile_seconds"):
    assert key in result
  _assert_planned(result)
  assert result["estimated_steps_per_sec"] > 0
  # A v3 program keeps only scalars outside HBM, so the HBM roofline counts nearly every byte.
  traffic = result["traffic"]
  assert 0 <= traffic["off_hbm_bytes"] < 0.02 * traffic["total_bytes"]
  assert result["hbm_traffic_bytes"] == traffic["total_bytes"] - traffic["off_hbm_bytes"]
  assert result["roofline_hbm_steps_per_sec"] > 0
  assert "GB to and from HBM" in done.stdout

  done = subprocess.run(base + ["--topology=v5litepod-1", "--config.batch_size=65536",
                                "--config.seq_len=128", f"--output={output}"],
                        capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert done.returncode == 0, done.stderr[-3000:]
  (result,) = json.loads(output.read_text())["results"]
  assert result["memory"]["fits"] is False
  assert "memory" in result["memory"]["compiler_message"].lower()
  assert "| script | NO |" in done.stdout

  done = subprocess.run(base + ["--topology=v3-7"], capture_output=True, text=True, timeout=300,
                        cwd=ROOT)
  assert done.returncode == 2
  last = done.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "v3-7" in last, done.stderr[-2000:]


@pytest.mark.slow
def test_squad_step_compiles_with_only_float32_all_reduces(v3_devices):
  report = tpu_programs.compile_step(_tiny("script", **{"model.max_position_embeddings": 128}),
                                     V3_8, "squad", v3_devices)
  _assert_planned(report)
  assert report["flops"] >= report["model_flops_per_device"]


@pytest.mark.slow
def test_fsdp_gradients_are_reduce_scattered_on_the_tpu():
  """Under mesh.fsdp on a v5e-8 the weights' gradients, the word embeddings' included (gathered
  whole at use), are reduce-scattered into their shards: none of them is all-reduced whole. (The
  TPU compiler writes a reduce-scatter as an all-reduce inside an all-reduce-scatter fusion.)"""
  tpu = tpu_programs.parse_slice("v5litepod-8")
  report = tpu_programs.compile_step(_tiny("mlm", **{"mesh.fsdp": True, "batch_size": 64}), tpu,
                                     "train", tpu_programs.tpu_devices(tpu))
  scattered = [a for c in report["collectives"] if c["kind"] == "reduce-scatter"
               for a in c["arrays"]]
  reduced = [a for c in report["collectives"] if c["kind"] == "all-reduce" for a in c["arrays"]]
  assert "f32[64,64]" in scattered  # the [512, 64] word embeddings' shard
  assert "f32[8,2,32]" in scattered  # a [64, 2, 32] attention kernel's shard
  assert not [a for a in reduced if a in ("f32[512,64]", "f32[64,2,32]", "f32[64,256]",
                                          "f32[256,64]")]
  assert all(a.startswith("f32[") for a in scattered + reduced)


@pytest.mark.slow
def test_fsdp_in_groups_reduces_the_embeddings_into_their_shards_on_the_tpu():
  """FSDP in two groups of 4 on a v5e-8 (mesh.fsdp_replicas=2): the lookups' gradients
  (sharding.ShardedLookup) are reduce-scattered within a group and each shard summed across
  the groups; the whole [512, 64] word table is never all-reduced. (Left to XLA, configs/large.py's
  f32[30592,1024] was all-reduced whole over a v5e-256's 256 devices.)"""
  tpu = tpu_programs.parse_slice("v5litepod-8")
  config = _tiny("script", **{"mesh.fsdp": True, "mesh.fsdp_replicas": 2, "batch_size": 64})
  report = tpu_programs.compile_step(config, tpu, "train", tpu_programs.tpu_devices(tpu))
  reduced = {(c["group_size"], a) for c in report["collectives"] if c["kind"] == "all-reduce"
             for a in c["arrays"]}
  scattered = {(c["group_size"], a) for c in report["collectives"]
               if c["kind"] == "reduce-scatter" for a in c["arrays"]}
  assert (4, "f32[128,64]") in scattered  # within a group: each device's quarter of the rows
  assert (2, "f32[128,64]") in reduced  # the quarter, summed across the two groups
  assert not [a for _, a in reduced if a == "f32[512,64]"]
  # The [128, 64] position embeddings likewise: a quarter each, summed across the groups.
  assert (4, "f32[32,64]") in scattered and (2, "f32[32,64]") in reduced


@pytest.mark.slow
def test_fused_attention_compiles_for_a_v3_8_with_only_the_planned_collectives(v3_devices,
                                                                               tmp_path):
  """model.attention_impl=pallas, SCRIPT and the evaluation in bfloat16 on a v3-8: Mosaic
  compiles the kernels (two per layer and pass in training, one in evaluation), each device
  runs them on its own sequences (no gather of the batch), every collective is a float32
  all-reduce, and the step's bytes fall below the XLA attention's."""
  reports = {}
  for impl in ("xla", "pallas"):
    for step in ("train", "eval"):
      hlo = tmp_path / f"{impl}_{step}.txt"
      reports[impl, step] = tpu_programs.compile_step(
          _tiny("script", **{"model.attention_impl": impl}), V3_8, step, v3_devices,
          hlo_path=str(hlo))
      _assert_planned(reports[impl, step])
      reports[impl, step]["kernels"] = hlo.read_text().count('custom_call_target="tpu_custom_call"')
  layers = load_config("tiny").model.num_layers
  assert reports["xla", "train"]["kernels"] == 0
  assert reports["pallas", "train"]["kernels"] == 2 * 2 * layers  # 2 passes, forward + backward
  assert reports["pallas", "eval"]["kernels"] >= layers
  assert reports["pallas", "train"]["bytes_accessed"] < reports["xla", "train"]["bytes_accessed"]


@pytest.mark.slow
def test_the_fused_mlm_head_compiles_for_a_v3_8_with_only_the_planned_collectives(v3_devices,
                                                                                  tmp_path):
  """mlm_head_impl=pallas, SCRIPT and ELECTRA in bfloat16 on a v3-8: Mosaic compiles the head's
  forward (loss, argmax, sample) and backward kernels, the collectives stay float32 all-reduces,
  and no [B, P, V] logits are left in the program (tiny's V = 512: any [b, P, 512] array)."""
  p = load_config("tiny").mask.max_predictions_per_seq
  logits = re.compile(rf"\b(?:f32|bf16)\[\d+,{p},512\]")
  for objective, impl in (("script", "xla"), ("script", "pallas"), ("electra", "pallas")):
    hlo = tmp_path / f"{objective}_{impl}.txt"
    report = tpu_programs.compile_step(_tiny(objective, mlm_head_impl=impl), V3_8, "train",
                                       v3_devices, hlo_path=str(hlo))
    _assert_planned(report)
    text = hlo.read_text()
    assert bool(logits.search(text)) == (impl == "xla"), (objective, impl)
    assert text.count('custom_call_target="tpu_custom_call"') == (2 if impl == "pallas" else 0)


@pytest.mark.slow
def test_the_kernels_fit_a_v3s_vmem_at_base_widths(v3_devices):
  """configs/base.py's per-device shapes in bfloat16 (32 sequences of 512, H = 768 in 12 heads,
  V = 30592): the attention kernels (query blocks, a loop over head groups), the critic's and
  the MLM head's kernels compile for a v3 (16 MiB of VMEM), gradients included."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from script_jax import fused_attention, fused_logsumexp  # pylint: disable=g-import-not-at-top
  mesh = Mesh(np.array(v3_devices).reshape(1, 8, 1), ("replica", "data", "model"))
  rows = P(("replica", "data"))
  b, t, p, h, v = 32 * 8, 512, 77, 768, 30592

  def spec(shape, dtype, where=rows):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, where))

  def attention(qkv, bias, keys):
    return fused_attention.pallas_attention(qkv, bias, keys, 12, 0.1, (mesh, rows)).astype(
        jnp.float32).sum()

  def critic_and_head(features, head_features, table, bias, labels, keys):
    lse = fused_logsumexp.pallas_logsumexp(features, table, bias, mesh=mesh).sum()
    nll = fused_logsumexp.pallas_mlm_head(head_features, table, bias, labels, keys, 1.0, 30522,
                                          True, mesh=mesh)[0].sum()
    return lse + nll

  keys = spec((2,), jnp.int32, P())
  jax.jit(jax.grad(attention)).trace(spec((b, t, 3 * h), jnp.bfloat16),
                                     spec((b, t), jnp.float32), keys).lower().compile()
  jax.jit(jax.grad(critic_and_head, argnums=(0, 1, 2, 3))).trace(
      spec((b, t, h), jnp.bfloat16), spec((b, p, h), jnp.bfloat16),
      spec((v, h), jnp.float32, P()), spec((v,), jnp.float32, P()), spec((b, p), jnp.int32),
      keys).lower().compile()
