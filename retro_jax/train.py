"""Training state, optimizer, loss and the jitted, sharded train step.

Shape glossary: B batch, N sequence length, L = N // m chunks, k neighbours,
r neighbour length, V vocabulary.

A batch is a dict of `tokens` int32 [B, N], `neighbours` int32 [B, L, k, r]
and optionally `loss_mask` [B, N] (1 where the token counts as a target).
Position t predicts token t + 1, so each sequence has N - 1 targets.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import haiku as hk
import jax
import jax.numpy as jnp
import optax

from retro_jax import sharding
from retro_jax.model import Retro

Batch = Dict[str, jax.Array]


class TrainState(NamedTuple):
  params: hk.Params
  opt_state: optax.OptState
  step: jax.Array   # int32 scalar.


def make_optimizer(learning_rate: float = 1e-4, warmup_steps: int = 750,
                   total_steps: int = 0, end_lr_ratio: float = 0.1,
                   weight_decay: float = 0.1, b1: float = 0.9,
                   b2: float = 0.95, eps: float = 1e-8,
                   clip_norm: Optional[float] = 1.0
                   ) -> optax.GradientTransformation:
  """AdamW with linear warmup then cosine decay, after global-norm clipping.

  `total_steps=0` keeps the rate constant after warmup (benchmarks).
  """
  if total_steps > warmup_steps:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup_steps, total_steps,
        end_value=learning_rate * end_lr_ratio)
  elif warmup_steps > 0:
    schedule = optax.linear_schedule(0.0, learning_rate, warmup_steps)
  else:
    schedule = learning_rate
  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps,
                           weight_decay=weight_decay))
  return optax.chain(*parts)


def cross_entropy(logits: jax.Array, tokens: jax.Array,
                  loss_mask: Optional[jax.Array]) -> Tuple[jax.Array, jax.Array]:
  """Summed next-token negative log-likelihood (nats) and target count.

  Position t predicts token t + 1; the last position has no target and gets
  weight 0 (rather than slicing the logits, which would copy them).

  Args:
    logits: float32 [B, N, V].
    tokens: int [B, N].
    loss_mask: optional [B, N], 1 where a token is a target.
  """
  targets = jnp.roll(tokens, -1, axis=1)                         # [B, N]
  lse = jax.nn.logsumexp(logits, axis=-1)                        # [B, N]
  picked = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
  nll = lse - picked                                             # [B, N]
  has_target = jnp.arange(tokens.shape[1]) < tokens.shape[1] - 1  # [N]
  weight = jnp.broadcast_to(has_target, nll.shape).astype(nll.dtype)
  if loss_mask is not None:
    weight = weight * jnp.roll(loss_mask, -1, axis=1).astype(nll.dtype)
  return jnp.sum(nll * weight), jnp.sum(weight)


def loss_fn(model: Retro, params: hk.Params, batch: Batch):
  """Mean next-token loss and metrics of one batch."""
  logits = model.apply(params, batch["tokens"], batch.get("neighbours"))
  nll, count = cross_entropy(logits, batch["tokens"], batch.get("loss_mask"))
  loss = nll / jnp.maximum(count, 1.0)
  return loss, {"loss": loss, "targets": count}


def init_state(model: Retro, optimizer: optax.GradientTransformation,
               rng: jax.Array, batch: Batch) -> TrainState:
  params = model.init(rng, batch["tokens"], batch.get("neighbours"))
  return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))


def train_step(model: Retro, optimizer: optax.GradientTransformation,
               state: TrainState, batch: Batch) -> Tuple[TrainState, Dict]:
  """One optimizer step (unjitted; see `jit_train_step`)."""
  grad_fn = jax.value_and_grad(lambda p: loss_fn(model, p, batch),
                               has_aux=True)
  (_, metrics), grads = grad_fn(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics["grad_norm"] = optax.tree.norm(grads)
  return TrainState(params, opt_state, state.step + 1), metrics


def state_shardings(model: Retro, optimizer: optax.GradientTransformation,
                    mesh, batch: Batch, strict: bool = False):
  """NamedShardings of the TrainState, from the parameter rules.

  Optimizer moments follow their parameter; scalars are replicated. Returns
  (abstract state, shardings, unmatched parameter paths).
  """
  abstract = jax.eval_shape(
      lambda b: init_state(model, optimizer, jax.random.key(0), b), batch)
  specs, unmatched = sharding.param_specs(abstract.params, mesh, strict)
  param_tree = jax.tree_util.tree_structure(abstract.params)

  def like_params(sub):
    # Any optimizer sub-state shaped like params (Adam mu and nu) shares specs.
    try:
      if jax.tree_util.tree_structure(sub) == param_tree:
        return specs
    except Exception:  # pylint: disable=broad-except
      pass
    return None

  def opt_specs(node):
    same = like_params(node)
    if same is not None:
      return same
    if isinstance(node, tuple) and not hasattr(node, "shape"):
      children = [opt_specs(c) for c in node]
      return type(node)(*children) if hasattr(node, "_fields") else tuple(children)
    return jax.tree_util.tree_map(lambda _: sharding.P(), node)

  state_specs = TrainState(specs, opt_specs(abstract.opt_state), sharding.P())
  return abstract, sharding.named(mesh, state_specs), unmatched


def jit_train_step(model: Retro, optimizer: optax.GradientTransformation,
                   mesh, state_sharding, batch: Batch) -> Callable:
  """`jax.jit` of `train_step` with state and batch shardings; the state is
  donated so parameters and moments are updated in place."""
  batch_sh = jax.tree_util.tree_map(
      lambda a: sharding.batch_sharding(mesh, a.ndim), batch)
  return jax.jit(lambda s, b: train_step(model, optimizer, s, b),
                 in_shardings=(state_sharding, batch_sh),
                 out_shardings=(state_sharding, None),
                 donate_argnums=(0,))


def init_sharded_state(model: Retro, optimizer, state_sharding,
                       rng: jax.Array, batch: Batch) -> TrainState:
  """Initialises the state directly in its sharding (never whole on one
  device)."""
  return jax.jit(lambda r, b: init_state(model, optimizer, r, b),
                 out_shardings=state_sharding)(rng, batch)
