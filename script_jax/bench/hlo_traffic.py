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
# dtype[dims] and, where the TPU program gives one, its layout {minor_to_major:T(tile)...}.
_ARRAY = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\](?:\{([\d,]*)(?::T\(([\d,]+)\))?)?")
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


def array_bytes(type_text: str) -> int:
  """The bytes of every array named in an HLO type ("f32[2,3]{1,0}", or a tuple of them),
  padded to its tile where the layout names one."""
  total = 0
  for dtype, dims, minor_to_major, tile in _ARRAY.findall(type_text):
    shape = [int(d) for d in dims.split(",") if d]
    total += _BYTES[dtype] * _padded(shape, minor_to_major, tile)
  return total


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
  "op_name"}, in program order."""
  sizes: dict[str, int] = {}
  rows = []
  for line in _entry(hlo):
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name, result, op, operands, attributes = m.groups()
    sizes[name] = array_bytes(result)
    if op in _FREE:
      continue
    if op.endswith("-done"):  # an asynchronous op's traffic is counted at its -start
      continue
    read = sum(sizes.get(o, 0) for o in re.findall(r"%([\w.\-]+)", operands))
    if op == "slice-start":  # ((operand), slice, context): the slice read and written
      moved = 2 * max(sizes[name] - read, 0)
    elif op == "copy-start":  # (operand, copy, context): read once, written once
      moved = 2 * read
    else:
      moved = read + sizes[name]
    op_name = _OP_NAME.search(attributes or "")
    rows.append({"name": name, "op": op, "result": re.sub(r"\{[^}]*\}", "", result),
                 "bytes": moved, "op_name": op_name.group(1) if op_name else ""})
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
  """{"total_bytes", "by_scope": the `top` largest scopes, "largest_ops": the `top` largest
  ops} of a compiled program's text."""
  rows = op_traffic(hlo)
  largest = sorted(rows, key=lambda r: -r["bytes"])[:top]
  return {"total_bytes": sum(r["bytes"] for r in rows),
          "by_scope": by_scope(rows, depth)[:top],
          "largest_ops": [{k: r[k] for k in ("op", "result", "bytes", "op_name")}
                          for r in largest]}
