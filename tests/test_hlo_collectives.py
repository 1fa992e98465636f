"""The test helper that reads collectives from compiled programs, on XLA's three group forms
and on a program compiled here."""

import jax
import jax.numpy as jnp
import numpy as np
from script_jax.bench import hlo_collectives


def test_the_three_forms_of_device_groups():
  parse = hlo_collectives.parse_groups
  assert parse("x), replica_groups={{0,2},{1,3}}, dimensions={0}") == (
      frozenset({0, 2}), frozenset({1, 3}))
  assert parse("x), replica_groups={}, to_apply=%add") == ()
  # [2,4]<=[4,2]T(1,0): iota(8) as [4,2], transposed to [2,4], its rows the groups.
  assert parse("x), replica_groups=[2,4]<=[4,2]T(1,0), dimensions={0}") == (
      frozenset({0, 2, 4, 6}), frozenset({1, 3, 5, 7}))
  assert parse("x), replica_groups=[4,2]<=[8], dimensions={0}") == tuple(
      frozenset({2 * i, 2 * i + 1}) for i in range(4))
  # The mesh form: axes of 4 and 2 over iota(8) as [2,4] transposed; grouping axis_0 (size 4)
  # leaves one group per index of axis_1.
  assert parse("x), replica_groups=mesh['axis_0'=4,'axis_1'=2], device_ids=([2,4]T(1,0)) "
               "{'axis_0'}, dimensions={0}") == (frozenset({0, 1, 2, 3}), frozenset({4, 5, 6, 7}))
  assert parse("x), replica_groups=mesh['axis_0'=4,'axis_1'=2], device_ids=([2,4]T(1,0)) "
               "{'axis_1'}, dimensions={0}") == tuple(frozenset({i, i + 4}) for i in range(4))
  assert parse("x), replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, to_apply=%add") == (
      frozenset({0, 1, 2, 3}), frozenset({4, 5, 6, 7}))
  assert parse("x), source_target_pairs={{0,1}}") is None


def test_a_compiled_sum_over_one_mesh_axis():
  """A sum over the columns of a (2, 4) mesh, compiled: its groups are the mesh's rows."""
  mesh = jax.make_mesh((2, 4), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a", "b"))
  by_row = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a"))
  x = jax.device_put(np.ones((2, 8), np.float32), split)
  hlo = jax.jit(lambda v: jnp.sum(v, axis=1), out_shardings=by_row).lower(x).compile().as_text()
  found = hlo_collectives.collectives(hlo)
  assert [c.kind for c in found] == ["all-reduce"]
  position = {d: i for i, d in enumerate(mesh.devices.flat)}
  rows = {frozenset(position[d] for d in row) for row in mesh.devices}
  assert set(found[0].groups) == rows
  assert found[0].shapes() == [(1,)]
