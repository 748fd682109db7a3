"""Ahead-of-time checks of the largest preset on a simulated 8-device mesh:
the sharding rules cover every parameter, the state splits across devices,
and init and one train step lower without allocating anything."""

import math

import jax
import jax.numpy as jnp
import pytest

import retro_jax
from retro_jax.core import sharding
from retro_jax.training import step as step_lib


@pytest.mark.slow
def test_7_5b_init_and_step_lower_sharded():
  cfg = retro_jax.RetroConfig.preset("7.5b", scan_layers=True, remat="full",
                                     compute_dtype="bfloat16")
  model = retro_jax.Retro(cfg)
  optimizer = step_lib.make_optimizer(1e-4, warmup_steps=750,
                                      total_steps=10_000)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "model": 2})
  b, n = 8, 2048
  batch = {"tokens": jax.ShapeDtypeStruct((b, n), jnp.int32),
           "neighbours": jax.ShapeDtypeStruct((b, n // 64, 2, 128),
                                              jnp.int32)}
  abstract, state_sh, unmatched = step_lib.state_shardings(
      model, optimizer, mesh, batch, strict=True)
  assert not unmatched

  # Bytes of the train state one device holds, from the shardings alone.
  def per_device(leaf, sh):
    shard = sh.shard_shape(leaf.shape)
    return math.prod(shard) * leaf.dtype.itemsize

  total = sum(math.prod(x.shape) * x.dtype.itemsize
              for x in jax.tree_util.tree_leaves(abstract))
  mine = sum(jax.tree_util.tree_leaves(
      jax.tree_util.tree_map(per_device, abstract, state_sh)))
  assert total > 80e9                     # ~7.5B params x (param, mu, nu).
  assert mine < total / 6, (mine, total)  # Split ~8 ways (norms replicated).

  with jax.set_mesh(mesh):
    init = jax.jit(lambda r, bt: step_lib.init_state(model, optimizer, r, bt),
                   out_shardings=state_sh)
    init.lower(jax.ShapeDtypeStruct((), jax.random.key(0).dtype), batch)
    step = step_lib.jit_train_step(model, optimizer, mesh, state_sh, batch)
    text = step.lower(abstract, batch).as_text()
  assert "sharding" in text
