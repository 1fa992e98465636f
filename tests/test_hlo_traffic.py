"""bench/hlo_traffic.py: a compiled program's bytes, op by op and by model scope, on a program
text whose sizes are worked out by hand."""

from script_jax.bench import hlo_traffic

PROGRAM = """HloModule jit_step, entry_computation_layout={(f32[4,8]{1,0}, bf16[8,2]{1,0})->f32[]}

%fused_computation (p0: f32[4,8], p1: bf16[8,2]) -> f32[4,2] {
  %p0 = f32[4,8]{1,0} parameter(0)
  ROOT %dot = f32[4,2]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main.1 (Arg_0.1: f32[4,8], Arg_1.2: bf16[8,2]) -> f32[] {
  %Arg_0.1 = f32[4,8]{1,0:T(8,128)} parameter(0)
  %Arg_1.2 = bf16[8,2]{1,0:T(8,128)(2,1)} parameter(1)
  %fusion.3 = f32[4,2]{1,0:T(4,128)} fusion(%Arg_0.1, %Arg_1.2), kind=kOutput, calls=%fused_computation, metadata={op_name="jit(step)/jvp(MaskedLM)/MaskedLM.encode/encoder/layer_11/ffn_output/dot_general"}
  %bitcast.4 = f32[8]{0} bitcast(%fusion.3)
  %all-reduce.5 = (f32[8]{0}, s32[3]{0}) all-reduce(%bitcast.4), replica_groups={}, metadata={op_name="jit(step)/transpose(jvp(MaskedLM))/MaskedLM.encode/encoder/layer_2/ffn_output/transpose()/dot_general"}
  %get-tuple-element.6 = f32[8]{0} get-tuple-element(%all-reduce.5), index=0
  ROOT %reduce.7 = f32[] reduce(%get-tuple-element.6, %Arg_0.1), dimensions={0}, metadata={op_name="jit(step)/add"}
}
"""


def test_bytes_of_each_op_are_its_operands_and_results():
  rows = hlo_traffic.op_traffic(PROGRAM)
  assert [r["op"] for r in rows] == ["fusion", "all-reduce", "reduce"]
  # In its TPU tiles: f32[4,8] T(8,128) takes 8 x 128 x 4 = 4096 bytes, bf16[8,2] 8 x 128 x 2
  # = 2048 read, f32[4,2] T(4,128) 2048 written. A bitcast is a view; its untiled f32[8] is
  # 32 bytes; the all-reduce writes (f32[8], s32[3]) 44; the reduce reads 32 and 4096 and
  # writes 4.
  assert [r["bytes"] for r in rows] == [4096 + 2048 + 2048, 32 + 44, 32 + 4096 + 4]
  summary = hlo_traffic.summary(PROGRAM, depth=4)
  assert summary["total_bytes"] == 8192 + 76 + 4132
  assert summary["by_scope"][0] == {"scope": "forward/MaskedLM.encode/encoder/layer_*/ffn_output",
                                    "bytes": 8192, "ops": 1}
  assert summary["largest_ops"][0]["result"] == "f32[4,2]"


def test_scopes_name_the_pass_and_fold_the_layers():
  scope = hlo_traffic.scope
  assert scope("jit(train_step)/transpose(jvp(MaskedLM))/MaskedLM.encode/encoder/layer_3/"
               "attention/jit(_take)/gather", 3) == "backward/MaskedLM.encode/encoder/layer_*"
  assert scope("jit(train_step)/jvp()/reduce_max") == "forward/reduce_max"
  assert scope("jit(train_step)/add") == "update/add"
  assert scope("") == "unnamed"
  assert hlo_traffic.array_bytes("(bf16[2,3]{1,0:T(8,128)(2,1)}, pred[5], f32[])") == (
      8 * 128 * 2 + 5 + 4)
  assert hlo_traffic.array_bytes("f32[2,3]{1,0}") == 24  # no tile: as it is
  # minor_to_major {0,1}: dimension 0 is the minor one, so it is the one rounded to 128.
  assert hlo_traffic.array_bytes("f32[3,200]{0,1:T(8,128)}") == 4 * 128 * 200


ASYNC = """HloModule jit_step

ENTRY %main.1 (Arg_0.1: f32[256,8]) -> f32[64,8] {
  %Arg_0.1 = f32[256,8]{1,0} parameter(0)
  %copy-start.2 = (f32[256,8]{1,0}, f32[256,8]{1,0:S(1)}, u32[]) copy-start(%Arg_0.1)
  %copy-done.3 = f32[256,8]{1,0:S(1)} copy-done(%copy-start.2)
  %slice-start.4 = ((f32[256,8]{1,0}), f32[64,8]{1,0}, s32[]) slice-start(%Arg_0.1), slice={[0:64], [0:8]}
  ROOT %slice-done.5 = f32[64,8]{1,0} slice-done(%slice-start.4)
}
"""


def test_asynchronous_copies_and_slices_count_what_they_move_once():
  """A copy (here into another memory space, S(1)) reads its operand and writes it once; a
  slice reads and writes its slice, not the whole operand its result tuple repeats; the -done
  halves add nothing."""
  rows = hlo_traffic.op_traffic(ASYNC)
  assert [(r["op"], r["bytes"]) for r in rows] == [("copy-start", 2 * 256 * 8 * 4),
                                                   ("slice-start", 2 * 64 * 8 * 4)]


# From a v5e program (v5e:2x4, libtpu 0.0.42): a float32 weight prefetched in slices into the
# core's on-chip memory S(1), joined in place by ConcatBitcast and read there by a product; an
# activation copied in the other direction, out of S(1) into HBM.
ON_CHIP = """HloModule jit_step

ENTRY %main (param.3: f32[256,1024], param.1: bf16[2048,256]) -> f32[2048,1024] {
  %param.3 = f32[256,1024]{1,0:T(8,128)} parameter(0)
  %param.1 = bf16[2048,256]{1,0:T(8,128)(2,1)S(1)} parameter(1)
  %slice-start = ((f32[256,1024]{1,0:T(8,128)}), f32[64,1024]{1,0:T(8,128)S(1)}, s32[]{:S(2)}) slice-start(%param.3), slice={[0:64], [0:1024]}
  %slice-start.1 = ((f32[256,1024]{1,0:T(8,128)}), f32[64,1024]{1,0:T(8,128)S(1)}, s32[]{:S(2)}) slice-start(%param.3), slice={[64:128], [0:1024]}
  %slice-start.2 = ((f32[256,1024]{1,0:T(8,128)}), f32[64,1024]{1,0:T(8,128)S(1)}, s32[]{:S(2)}) slice-start(%param.3), slice={[128:192], [0:1024]}
  %slice-start.3 = ((f32[256,1024]{1,0:T(8,128)}), f32[64,1024]{1,0:T(8,128)S(1)}, s32[]{:S(2)}) slice-start(%param.3), slice={[192:256], [0:1024]}
  %slice-done = f32[64,1024]{1,0:T(8,128)S(1)} slice-done(%slice-start)
  %slice-done.1 = f32[64,1024]{1,0:T(8,128)S(1)} slice-done(%slice-start.1)
  %slice-done.2 = f32[64,1024]{1,0:T(8,128)S(1)} slice-done(%slice-start.2)
  %slice-done.3 = f32[64,1024]{1,0:T(8,128)S(1)} slice-done(%slice-start.3)
  %custom-call = f32[256,1024]{1,0:T(8,128)S(1)} custom-call(%slice-done, %slice-done.1, %slice-done.2, %slice-done.3), custom_call_target="ConcatBitcast", backend_config={"flag_configs":[]}
  %fusion.2 = f32[2048,1024]{1,0:T(8,128)S(1)} fusion(%param.1, %custom-call), kind=kOutput, calls=%fused_computation
  %copy-start = (f32[2048,1024]{1,0:T(8,128)}, f32[2048,1024]{1,0:T(8,128)S(1)}, u32[]{:S(2)}) copy-start(%fusion.2)
  ROOT %copy-done = f32[2048,1024]{1,0:T(8,128)} copy-done(%copy-start)
}
"""


def test_bytes_outside_hbm_are_told_apart():
  """Arrays whose layout names memory space S(1) are on chip: the slices read 256 KiB each
  from HBM and write it on chip; ConcatBitcast moves nothing; the product reads and writes only
  on-chip arrays; the copy out reads on chip and writes HBM. On a v3 program (no S(1)) nothing
  but scalars is off HBM."""
  rows = hlo_traffic.op_traffic(ON_CHIP)
  piece, weight, act, out = 64 * 1024 * 4, 256 * 1024 * 4, 2048 * 256 * 2, 2048 * 1024 * 4
  assert [r["op"] for r in rows] == ["slice-start"] * 4 + ["fusion", "copy-start"]
  for r in rows[:4]:
    assert (r["bytes"], r["off_hbm_bytes"]) == (2 * piece, piece)
  assert (rows[4]["bytes"], rows[4]["off_hbm_bytes"]) == (act + weight + out,) * 2
  assert (rows[5]["bytes"], rows[5]["off_hbm_bytes"]) == (2 * out, out)
  total = hlo_traffic.summary(ON_CHIP)
  assert total["off_hbm_bytes"] == 4 * piece + act + weight + out + out
  assert total["total_bytes"] - total["off_hbm_bytes"] == weight + out  # read once, written once
  assert hlo_traffic.summary(PROGRAM)["off_hbm_bytes"] == 0
