"""Where a compiled program's memory traffic goes: each top-level op of its entry computation with
the bytes of its operands and results (a fusion reads its operands from HBM and writes its
results there), summed by the model scope its metadata names (`forward/encoder/layer_*/attention`).

An approximation of what the cost analysis counts: each array is padded to its TPU tile (as the
cost analysis counts it), every operand is taken whole (a fusion that reads a slice of one is
charged all of it), an asynchronous copy or slice is counted once at its -start (what it reads
and writes), and a while loop is one op whose operands are its state, its body not broken down. On configs/small.py's bfloat16 steps for a v3-8 the total is within 1-2% of the cost
analysis's bytes accessed (docs/benchmarks.md 7.7); tests/test_tpu_compile.py checks 25% on tiny.
"""

from __future__ import annotations

import collections
import math
import re
from typing import Any

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
# dtype[dims] and, where the TPU program gives one, its layout {minor_to_major:T(tile)...S(m)}.
_ARRAY = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\](?:\{([\d,]*)(?::([^}]*))?\})?")
_TILE = re.compile(r"T\(([\d,]+)\)")
# An array whose layout names a memory space S(m), m > 0, is not in HBM: S(1) is the core's
# on-chip vector memory, where v5e's and v6e's compilers keep weights and activations between
# ops (docs/benchmarks.md 7.12); v3's programs use other spaces only for scalars.
_MEMORY_SPACE = re.compile(r"S\((\d+)\)")
# Custom calls that move nothing: ConcatBitcast joins adjacent slices in place.
_FREE_CALLS = ("ConcatBitcast",)
# "%name = TYPE op(operands), attributes" (TYPE may be a tuple; TPU layouts hold parentheses).
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*?)\)(, .*)?$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# Ops that move nothing themselves: views and the plumbing of tuples.
_FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all",
         "partition-id", "replica-id"}


def _padded(dims: list[int], minor_to_major: str, tile: str) -> int:
  """Elements an array takes in memory: its minor dimensions rounded up to the TPU layout's
  tile (f32[16,64]{1,0:T(8,128)} holds 16 x 128), as the cost analysis counts them."""
  if not tile or not dims:
    return math.prod(dims)
  order = [int(i) for i in minor_to_major.split(",") if i] or list(range(len(dims)))[::-1]
  physical = [dims[i] for i in reversed(order)]  # major to minor
  tile_dims = [int(t) for t in tile.split(",")]
  for k, t in enumerate(reversed(tile_dims)):
    if k < len(physical):
      physical[-1 - k] = -(-physical[-1 - k] // t) * t
  return math.prod(physical)


def _sizes(type_text: str) -> tuple[int, int]:
  """(bytes, of which outside HBM) of every array named in an HLO type ("f32[2,3]{1,0}", or a
  tuple of them), each padded to its tile where the layout names one."""
  total = off_hbm = 0
  for dtype, dims, minor_to_major, rest in _ARRAY.findall(type_text):
    shape = [int(d) for d in dims.split(",") if d]
    tile = _TILE.search(rest)
    n = _BYTES[dtype] * _padded(shape, minor_to_major, tile.group(1) if tile else "")
    total += n
    space = _MEMORY_SPACE.search(rest)
    if space and int(space.group(1)) > 0:
      off_hbm += n
  return total, off_hbm


def array_bytes(type_text: str) -> int:
  """The bytes of every array named in an HLO type ("f32[2,3]{1,0}", or a tuple of them),
  padded to its tile where the layout names one."""
  return _sizes(type_text)[0]


def _entry(hlo: str) -> list[str]:
  lines = hlo.splitlines()
  start = next((i for i, line in enumerate(lines) if line.startswith("ENTRY")), None)
  if start is None:
    raise ValueError("no ENTRY computation in the program's text")
  body = []
  for line in lines[start + 1:]:
    if line.startswith("}"):
      break
    body.append(line)
  return body


def scope(op_name: str, depth: int = 4) -> str:
  """A model scope from an op's metadata: "jit(train_step)/transpose(jvp(MaskedLM))/
  MaskedLM.encode/encoder/layer_3/ffn_output/dot_general" -> "backward/MaskedLM.encode/encoder/
  layer_*" at depth 3. Ops outside the differentiated function (the optimizer) are "update"."""
  parts = op_name.split("/")[1:]  # the jitted function's name first
  if not parts:
    return "unnamed"
  head = parts[0]
  if head.startswith("transpose("):
    direction, parts = "backward", parts[1:]
  elif head.startswith("jvp("):
    direction, parts = "forward", parts[1:]
  else:
    direction = "update"
  kept = [re.sub(r"^layer_\d+$", "layer_*", p) for p in parts
          if not p.startswith(("jit(", "transpose(", "jvp("))][:depth]
  return "/".join([direction] + kept)


def op_traffic(hlo: str) -> list[dict[str, Any]]:
  """Each top-level op of the program that moves data: {"name", "op", "result", "bytes",
  "off_hbm_bytes" (the part read from or written to memory outside HBM), "op_name"}, in
  program order."""
  sizes: dict[str, tuple[int, int]] = {}
  rows = []
  for line in _entry(hlo):
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name, result, op, operands, attributes = m.groups()
    sizes[name] = _sizes(result)
    if op in _FREE or (op == "custom-call" and any(
        f'custom_call_target="{c}"' in (attributes or "") for c in _FREE_CALLS)):
      continue
    if op.endswith("-done"):  # an asynchronous op's traffic is counted at its -start
      continue
    operand_sizes = [sizes.get(o, (0, 0)) for o in re.findall(r"%([\w.\-]+)", operands)]
    read, read_off = sum(n for n, _ in operand_sizes), sum(o for _, o in operand_sizes)
    written, written_off = sizes[name]
    if op == "slice-start":  # ((operand), slice, context): the slice read and written
      piece = _ARRAY.search(result[result.index(")") + 1:])
      piece, piece_off = _sizes(piece.group(0)) if piece else (0, 0)
      moved = 2 * piece
      # Written where the result's layout says; read from where the operand is.
      off = piece_off + (piece if read and read_off == read else 0)
    elif op == "copy-start":  # (copy, operand, context): read once, written once
      moved = 2 * read
      first = _ARRAY.search(result)
      off = read_off + (_sizes(first.group(0))[1] if first else 0)
    else:
      moved, off = read + written, read_off + written_off
    op_name = _OP_NAME.search(attributes or "")
    rows.append({"name": name, "op": op, "result": re.sub(r"\{[^}]*\}", "", result),
                 "bytes": moved, "off_hbm_bytes": min(off, moved),
                 "op_name": op_name.group(1) if op_name else ""})
  return rows


def by_scope(rows: list[dict[str, Any]], depth: int = 4) -> list[dict[str, Any]]:
  """The ops' bytes summed by `scope`, largest first: {"scope", "bytes", "ops"}."""
  total, count = collections.Counter(), collections.Counter()
  for r in rows:
    key = scope(r["op_name"], depth)
    total[key] += r["bytes"]
    count[key] += 1
  return [{"scope": k, "bytes": b, "ops": count[k]} for k, b in total.most_common()]


def summary(hlo: str, depth: int = 4, top: int = 12) -> dict[str, Any]:
  """{"total_bytes", "off_hbm_bytes" (the part outside HBM: on-chip memory), "by_scope": the
  `top` largest scopes, "largest_ops": the `top` largest ops} of a compiled program's text."""
  rows = op_traffic(hlo)
  largest = sorted(rows, key=lambda r: -r["bytes"])[:top]
  return {"total_bytes": sum(r["bytes"] for r in rows),
          "off_hbm_bytes": sum(r["off_hbm_bytes"] for r in rows),
          "by_scope": by_scope(rows, depth)[:top],
          "largest_ops": [{k: r[k] for k in ("op", "result", "bytes", "op_name")}
                          for r in largest]}
