"""The collectives of a compiled program's text (`jit(f).lower(...).compile().as_text()`): their
kind, result type and the device groups each runs over.

XLA writes a collective's groups in one of three forms, all parsed here:
  replica_groups={{0,1},{2,3}}                                 explicit
  replica_groups=[2,4]<=[4,2]T(1,0)                            iota: [groups, size] of a tile
  replica_groups=mesh['axis_0'=4,'axis_1'=2], device_ids=([2,4]T(1,0)) {'axis_0'}
                                                               mesh: the named axes grouped
                                                               (no device_ids: in order)
Device numbers are positions in the program's device assignment (the mesh's devices, flat).
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

_KINDS = ("all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter|"
          "collective-broadcast")
# The result type may be a tuple (XLA combines collectives): "(f32[2,32]{1,0}, ...)"; TPU
# layouts hold parentheses too ("{0,1:T(8,128)}"), so a tuple runs to the ") kind(" after it.
_OP = re.compile(r"= (\(.*?\)|\S+) (" + _KINDS + r")(-start|-done)?\((.*)")
_INTS = re.compile(r"\d+")


@dataclasses.dataclass(frozen=True)
class Collective:
  kind: str          # "all-gather", ...
  result: str        # "f32[64,256]{1,0}" or a tuple of them
  # None where the op names none (collective-permute); () for every device as one group.
  groups: tuple[frozenset[int], ...] | None

  def shapes(self) -> list[tuple[int, ...]]:
    """The result's array shapes (one, or each of a tuple's)."""
    return [tuple(int(d) for d in _INTS.findall(dims))
            for dims in re.findall(r"\[([\d,]*)\]", self.result)]


def _ints(text: str | None) -> list[int]:
  return [int(x) for x in _INTS.findall(text or "")]


def _tile(shape: list[int], perm: list[int]) -> np.ndarray:
  """iota(prod(shape)) reshaped to `shape`, then transposed by `perm` (XLA's <=[..]T(..))."""
  ids = np.arange(math.prod(shape)).reshape(shape)
  return ids.transpose(perm) if perm else ids


def parse_groups(attributes: str) -> tuple[frozenset[int], ...] | None:
  """The device groups in an op's attributes (the text after its opening parenthesis)."""
  mesh = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\[([\d,]*)\]"
                   r"(?:T\(([\d,]*)\))?\))? \{([^}]*)\}", attributes)
  if mesh:  # without device_ids, the devices in order
    sizes = [int(s) for s in re.findall(r"'axis_\d+'=(\d+)", mesh.group(1))]
    tile = _ints(mesh.group(2)) or [math.prod(sizes)]
    ids = _tile(tile, _ints(mesh.group(3))).reshape(sizes)
    grouped = [int(a) for a in re.findall(r"'axis_(\d+)'", mesh.group(4))]
    size = math.prod(sizes[a] for a in grouped)
    rows = np.moveaxis(ids, grouped, list(range(ids.ndim - len(grouped), ids.ndim)))
    return tuple(frozenset(int(d) for d in row) for row in rows.reshape(-1, size))
  iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]*)\](?:T\(([\d,]*)\))?",
                   attributes)
  if iota:
    ids = _tile(_ints(iota.group(3)), _ints(iota.group(4)))
    rows = ids.reshape(int(iota.group(1)), int(iota.group(2)))
    return tuple(frozenset(int(d) for d in row) for row in rows)
  explicit = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", attributes)
  if explicit:  # {} (no groups listed): one group of every device, returned as ()
    return tuple(frozenset(_ints(g)) for g in re.findall(r"\{([\d,]*)\}", explicit.group(1)))
  return None


def collectives(hlo: str) -> list[Collective]:
  """Every collective of the program (an async pair counted at its -start and -done)."""
  return [Collective(m.group(2), m.group(1), parse_groups(m.group(4)))
          for m in _OP.finditer(hlo)]


_BYTES_PER_ELEMENT = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2,
                      "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8,
                      "u64": 8}
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")


def arrays(result: str) -> list[tuple[str, tuple[int, ...]]]:
  """(dtype, shape) of each array in a result type: "f32[2,3]{1,0}" or a tuple of them."""
  return [(dtype, tuple(int(d) for d in _INTS.findall(dims)))
          for dtype, dims in _ARRAY.findall(result)]


_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.-]+) \(.*\) -> (.*) \{$")


def summary(hlo: str) -> list[dict]:
  """Each collective of the program as {kind, arrays: ["bf16[256]", ...], bytes, group_size},
  the asynchronous pairs counted once (at their -start), largest first.

  The TPU compiler writes a reduce-scatter as an all-reduce inside a fusion computation named
  all-reduce-scatter.N, whose outputs are the shards (it moves a reduce-scatter's bytes): such
  an all-reduce is reported as the reduce-scatter it is, with the shards as its arrays."""
  rows, computation, outputs = [], "", ""
  for line in hlo.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      computation, outputs = header.group(1), header.group(2)
      continue
    m = _OP.search(line)
    if not m or m.group(3) == "-done":
      continue
    op = Collective(m.group(2), m.group(1), parse_groups(m.group(4)))
    kind, parts = op.kind, arrays(op.result)
    if m.group(3) == "-start" and kind in ("all-gather", "collective-permute"):
      parts = parts[len(parts) // 2:]  # (operands..., results...): the results
    if kind == "all-reduce" and computation.startswith("all-reduce-scatter"):
      kind, parts = "reduce-scatter", arrays(outputs)
    groups = op.groups
    rows.append({
        "kind": kind,
        "arrays": [f"{dtype}[{','.join(map(str, shape))}]" for dtype, shape in parts],
        "bytes": sum(_BYTES_PER_ELEMENT.get(dtype, 4) * math.prod(shape)
                     for dtype, shape in parts),
        "group_size": (len(next(iter(groups))) if groups else None),
    })
  return sorted(rows, key=lambda r: -r["bytes"])
