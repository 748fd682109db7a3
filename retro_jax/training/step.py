"""Training state, optimizer, loss and the jitted, sharded train step.

Shape glossary: B batch, N sequence length, L = N // m chunks, k neighbours,
r neighbour length, V vocabulary.

A batch is a dict of `tokens` int32 [B, N], `neighbours` int32 [B, L, k, r]
and optionally `loss_mask` [B, N] (1 where the token counts as a target).
Position t predicts token t + 1, so each sequence has N - 1 targets.
"""

from __future__ import annotations

import re
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import haiku as hk
import jax
import jax.numpy as jnp
import optax

from retro_jax.core import sharding
from retro_jax.model.network import Retro
from retro_jax.training import checkpoints

Batch = Dict[str, jax.Array]


class TrainState(NamedTuple):
  params: hk.Params
  opt_state: optax.OptState
  step: jax.Array   # int32 scalar.


def make_schedule(learning_rate: float = 1e-4, warmup_steps: int = 750,
                  total_steps: int = 0, end_lr_ratio: float = 0.1
                  ) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate`, then cosine decay to
  `learning_rate * end_lr_ratio` at `total_steps` (paper App. C.1).

  `total_steps=0` keeps the rate constant after warmup (benchmarks).
  """
  if total_steps > warmup_steps:
    return optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup_steps, total_steps,
        end_value=learning_rate * end_lr_ratio)
  if warmup_steps > 0:
    return optax.linear_schedule(0.0, learning_rate, warmup_steps)
  return optax.constant_schedule(learning_rate)


def make_optimizer(learning_rate: float = 1e-4, warmup_steps: int = 750,
                   total_steps: int = 0, end_lr_ratio: float = 0.1,
                   weight_decay: float = 0.1, b1: float = 0.9,
                   b2: float = 0.95, eps: float = 1e-8,
                   clip_norm: Optional[float] = 1.0,
                   retrieval_lr_scale: float = 1.0
                   ) -> optax.GradientTransformation:
  """AdamW with linear warmup then cosine decay, after global-norm clipping.

  `total_steps=0` keeps the rate constant after warmup (benchmarks).
  `retrieval_lr_scale` multiplies the rate (and so the decay step) of the
  CCA layers and the neighbour encoder (`is_retrieval_module`).
  """
  schedule = make_schedule(learning_rate, warmup_steps, total_steps,
                           end_lr_ratio)
  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps,
                           weight_decay=weight_decay))
  if retrieval_lr_scale != 1.0:
    parts.append(scale_retrieval_updates(retrieval_lr_scale))
  return optax.chain(*parts)


def optimizer_from_config(train) -> optax.GradientTransformation:
  """`make_optimizer` with the fields of a run config's `train` section
  (configs/base.py), as the training loop builds it."""
  return make_optimizer(
      train.learning_rate, train.warmup_steps, train.total_steps,
      train.end_lr_ratio, weight_decay=train.weight_decay, b2=train.b2,
      clip_norm=train.clip_norm or None,
      retrieval_lr_scale=train.get("retrieval_lr_scale", 1.0))


def scale_retrieval_updates(scale: float) -> optax.GradientTransformation:
  """Multiplies the updates of retrieval parameters (CCA, encoder) by
  `scale`: after AdamW, the same as a `scale` times larger learning rate
  for them. Which leaves are scaled is read from the parameter paths at
  trace time, so the transform has no state."""

  def update(updates, state, params=None):
    del params

    def one(path, u):
      key = _param_key(path)
      return u * scale if key and is_retrieval_module(key[0]) else u

    return jax.tree_util.tree_map_with_path(one, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(),
                                      update)


# -- trainable subsets (RETROfit) ---------------------------------------------
TRAINABLE = ("all", "retrieval")

# Modules a RETROfit trains (paper §4.2): chunked cross-attention and the
# neighbour encoder; everything else is the frozen baseline.
_RETRIEVAL_MODULE = re.compile(
    r"(^|/)(cca|cca_norm|encoder|enc_embed|enc_embed_proj)(/|$)")


def is_retrieval_module(module_name: str) -> bool:
  """True for parameters of CCA layers and the neighbour encoder."""
  return bool(_RETRIEVAL_MODULE.search(module_name))


def split_params(params: hk.Params, trainable: str = "all"
                 ) -> Tuple[hk.Params, hk.Params]:
  """(trained, frozen) halves of `params` for a `trainable` setting."""
  if trainable not in TRAINABLE:
    raise ValueError(f"trainable must be one of {TRAINABLE}, got "
                     f"{trainable!r}")
  if trainable == "all":
    return params, {}
  return hk.data_structures.partition(
      lambda module, name, value: is_retrieval_module(module), params)


def cross_entropy(logits: jax.Array, tokens: jax.Array,
                  loss_mask: Optional[jax.Array]
                  ) -> Tuple[jax.Array, jax.Array]:
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
  # The last position has no target, so the last chunk's neighbours (which
  # reach only it) are not encoded: the loss and gradients are unchanged.
  logits = model.apply(params, batch["tokens"], batch.get("neighbours"),
                       retrieve_for_last_position=False)
  nll, count = cross_entropy(logits, batch["tokens"], batch.get("loss_mask"))
  loss = nll / jnp.maximum(count, 1.0)
  return loss, {"loss": loss, "targets": count}


def init_state(model: Retro, optimizer: optax.GradientTransformation,
               rng: jax.Array, batch: Batch, trainable: str = "all"
               ) -> TrainState:
  """Fresh state; the optimizer state covers the trained parameters only."""
  params = model.init(rng, batch["tokens"], batch.get("neighbours"))
  trained, _ = split_params(params, trainable)
  return TrainState(params, optimizer.init(trained), jnp.zeros((), jnp.int32))


def _microbatches(batch: Batch, accum_steps: int) -> Batch:
  """[B, ...] -> [A, B / A, ...]; micro-batch i holds rows i, i + A, ... so
  each one spreads evenly over the data-parallel shards of the batch."""
  def split(x):
    b = x.shape[0]
    x = x.reshape((b // accum_steps, accum_steps) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)                          # [A, B/A, ...]
  return jax.tree_util.tree_map(split, batch)


def _accumulated_grads(model: Retro, trained: hk.Params, frozen: hk.Params,
                       batch: Batch, accum_steps: int):
  """Gradient of the mean loss over `accum_steps` micro-batches, summing the
  summed NLL and target counts so it equals the gradient of the whole batch.
  """
  def nll_sum(tp, mb):
    params = hk.data_structures.merge(tp, frozen) if frozen else tp
    logits = model.apply(params, mb["tokens"], mb.get("neighbours"),
                         retrieve_for_last_position=False)
    return cross_entropy(logits, mb["tokens"], mb.get("loss_mask"))

  grad_fn = jax.value_and_grad(nll_sum, has_aux=True)

  def body(carry, mb):
    nll, count, grads = carry
    (n, c), g = grad_fn(trained, mb)
    return (nll + n, count + c, jax.tree_util.tree_map(jnp.add, grads, g)), None

  zeros = jax.tree_util.tree_map(jnp.zeros_like, trained)
  init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
  (nll, count, grads), _ = jax.lax.scan(
      body, init, _microbatches(batch, accum_steps))
  count = jnp.maximum(count, 1.0)
  grads = jax.tree_util.tree_map(lambda g: g / count, grads)
  loss = nll / count
  return grads, {"loss": loss, "targets": count}


def train_step(model: Retro, optimizer: optax.GradientTransformation,
               state: TrainState, batch: Batch, trainable: str = "all",
               accum_steps: int = 1) -> Tuple[TrainState, Dict]:
  """One optimizer step (unjitted; see `jit_train_step`).

  Args:
    trainable: "all", or "retrieval" to update only CCA and encoder weights
      (RETROfit); frozen parameters pass through untouched, bit for bit.
    accum_steps: micro-batches whose gradients are accumulated into this one
      step (the batch size must divide by it).
  """
  trained, frozen = split_params(state.params, trainable)
  if accum_steps == 1:
    def mean_loss(tp):
      params = hk.data_structures.merge(tp, frozen) if frozen else tp
      return loss_fn(model, params, batch)
    (_, metrics), grads = jax.value_and_grad(mean_loss, has_aux=True)(trained)
  else:
    grads, metrics = _accumulated_grads(model, trained, frozen, batch,
                                        accum_steps)
  updates, opt_state = optimizer.update(grads, state.opt_state, trained)
  trained = optax.apply_updates(trained, updates)
  params = hk.data_structures.merge(trained, frozen) if frozen else trained
  metrics["grad_norm"] = optax.tree.norm(grads)
  return TrainState(params, opt_state, state.step + 1), metrics


def _param_key(path) -> Optional[Tuple[str, str]]:
  """(module, name) of the last two dict keys of a tree path, if any."""
  keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
  return tuple(keys[-2:]) if len(keys) >= 2 else None


def opt_state_specs(opt_state, params, param_specs):
  """PartitionSpecs of an optimizer state: a leaf stored under a parameter's
  (module, name) with that parameter's shape (Adam mu and nu, in any
  optax wrapper: chain, masked, multi_transform) shares its spec; everything
  else (counts, scalars) is replicated."""
  by_key = {}
  for (path, leaf), spec in zip(
      jax.tree_util.tree_leaves_with_path(params),
      jax.tree_util.tree_leaves(param_specs,
                                is_leaf=lambda x: isinstance(x, sharding.P))):
    by_key[_param_key(path)] = (tuple(leaf.shape), spec)

  def one(path, leaf):
    shape, spec = by_key.get(_param_key(path), (None, None))
    if spec is not None and tuple(leaf.shape) == shape:
      return spec
    return sharding.P()

  return jax.tree_util.tree_map_with_path(one, opt_state)


def state_specs(model: Retro, optimizer: optax.GradientTransformation,
                mesh, batch: Batch, strict: bool = False,
                trainable: str = "all"):
  """PartitionSpecs of the TrainState, from the parameter rules (`mesh` may
  be abstract: nothing is allocated).

  Optimizer moments follow their parameter; scalars are replicated. Returns
  (abstract state, specs, unmatched parameter paths).
  """
  abstract = jax.eval_shape(
      lambda b: init_state(model, optimizer, jax.random.key(0), b, trainable),
      batch)
  specs, unmatched = sharding.param_specs(abstract.params, mesh, strict)
  specs = TrainState(
      specs, opt_state_specs(abstract.opt_state, abstract.params, specs),
      sharding.P())
  return abstract, specs, unmatched


def state_shardings(model: Retro, optimizer: optax.GradientTransformation,
                    mesh, batch: Batch, strict: bool = False,
                    trainable: str = "all"):
  """NamedShardings of the TrainState (see `state_specs`). Returns
  (abstract state, shardings, unmatched parameter paths).
  """
  abstract, specs, unmatched = state_specs(model, optimizer, mesh, batch,
                                           strict, trainable)
  return abstract, sharding.named(mesh, specs), unmatched


def check_accumulation(batch_size: int, accum_steps: int, mesh) -> None:
  """Raises ValueError unless micro-batches divide over the data axes."""
  if accum_steps < 1 or batch_size % accum_steps:
    raise ValueError(f"train.accum_steps={accum_steps} must be >= 1 and "
                     f"divide train.batch_size={batch_size}")
  sharding.check_batch_divides(batch_size // accum_steps, mesh)


def jit_train_step(model: Retro, optimizer: optax.GradientTransformation,
                   mesh, state_sharding, batch: Batch, trainable: str = "all",
                   accum_steps: int = 1) -> Callable:
  """`jax.jit` of `train_step` with state and batch shardings; the state is
  donated so parameters and moments are updated in place."""
  batch_sh = jax.tree_util.tree_map(
      lambda a: sharding.batch_sharding(mesh, a.ndim), batch)
  return jax.jit(
      lambda s, b: train_step(model, optimizer, s, b, trainable, accum_steps),
      in_shardings=(state_sharding, batch_sh),
      out_shardings=(state_sharding, None),
      donate_argnums=(0,))


def init_sharded_state(model: Retro, optimizer, state_sharding,
                       rng: jax.Array, batch: Batch,
                       trainable: str = "all") -> TrainState:
  """Initialises the state directly in its sharding (never whole on one
  device). Only the shapes and dtypes of `batch` matter (arrays or
  ShapeDtypeStructs): zero inputs are built inside the jit."""
  def init(r):
    zeros = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype),
                                   batch)
    return init_state(model, optimizer, r, zeros, trainable)
  return jax.jit(init, out_shardings=state_sharding)(rng)


def restore_params(workdir: str, step: Optional[int] = None, mesh=None):
  """`checkpoints.restore_params` with the params placed by the parameter
  rules of `retro_jax.core.sharding` on `mesh` (default: one local device).
  Returns (run config, params, step)."""
  shardings = None
  if mesh is not None:
    shardings = lambda abstract: sharding.named(
        mesh, sharding.param_specs(abstract, mesh)[0])
  return checkpoints.restore_params(workdir, step, shardings)
