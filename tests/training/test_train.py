"""retro_jax.training.step against direct computations: the loss, the optimizer,
RETROfit parameter subsets and gradient accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from retro_jax import Retro, RetroConfig
from retro_jax.training import step as step_lib


def test_cross_entropy_equals_direct_sum():
  rng = np.random.default_rng(0)
  b, n, v = 2, 8, 11
  logits = rng.standard_normal((b, n, v)).astype(np.float32)
  tokens = rng.integers(1, v, (b, n)).astype(np.int32)
  mask = (rng.random((b, n)) > 0.3).astype(np.float32)
  nll, count = step_lib.cross_entropy(jnp.asarray(logits), jnp.asarray(tokens),
                                   jnp.asarray(mask))
  want_sum, want_count = 0.0, 0
  for i in range(b):
    for t in range(n - 1):              # Position t predicts token t + 1.
      if mask[i, t + 1]:
        row = logits[i, t].astype(np.float64)
        lse = np.log(np.sum(np.exp(row - row.max()))) + row.max()
        want_sum += lse - row[tokens[i, t + 1]]
        want_count += 1
  assert int(count) == want_count
  np.testing.assert_allclose(float(nll), want_sum, rtol=1e-5)


@pytest.mark.slow
def test_loss_gradients_equal_those_of_full_retrieval():
  """The train loss skips the last chunk's neighbours; its value and every
  gradient equal the loss computed with them (no target sees them)."""
  cfg = RetroConfig.preset("tiny")
  model = Retro(cfg)
  rng = np.random.default_rng(0)
  batch = {"tokens": rng.integers(1, cfg.vocab_size, (2, 192), np.int32),
           "neighbours": rng.integers(1, cfg.vocab_size, (2, 3, 2, 128),
                                      np.int32)}
  params = model.init(jax.random.key(0), batch["tokens"], batch["neighbours"])

  def full_loss(p):
    logits = model.apply(p, batch["tokens"], batch["neighbours"])
    nll, count = step_lib.cross_entropy(logits, batch["tokens"], None)
    return nll / count

  (loss, _), grads = jax.jit(jax.value_and_grad(
      lambda p: step_lib.loss_fn(model, p, batch), has_aux=True))(params)
  want_loss, want_grads = jax.jit(jax.value_and_grad(full_loss))(params)
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
  flat, _ = jax.tree_util.tree_flatten_with_path(grads)
  want = dict(jax.tree_util.tree_flatten_with_path(want_grads)[0])
  for path, g in flat:
    np.testing.assert_allclose(np.asarray(g), np.asarray(want[path]),
                               rtol=1e-4, atol=1e-6, err_msg=str(path))
  enc = grads["decoder/layer_01/encoder/layer_00/mlp"]["w_in"]
  assert float(jnp.abs(enc).max()) > 0, "encoder got no gradient at all"


def test_schedule_warms_up_then_decays():
  opt = step_lib.make_optimizer(1.0, warmup_steps=10, total_steps=100,
                             end_lr_ratio=0.1, weight_decay=0.0,
                             clip_norm=None)
  params = {"w": jnp.zeros(())}
  state = opt.init(params)
  lrs = []
  for _ in range(100):
    # With Adam's normalised step, |update| ~ lr for a constant gradient.
    updates, state = opt.update({"w": jnp.ones(())}, state, params)
    lrs.append(-float(updates["w"]))
  assert lrs[0] < lrs[5] < lrs[9]                  # Warmup rises.
  assert max(lrs) <= 1.0 + 1e-3
  assert lrs[20] > lrs[60] > lrs[99]               # Cosine decays...
  np.testing.assert_allclose(lrs[99], 0.1, rtol=0.05)  # ...to end_lr_ratio.


def test_clipping_applies_before_adam():
  """Adam normalises updates, so clipping shows in its first moment: after
  one step mu = (1 - b1) * clipped gradient, whose norm is the clip norm."""
  opt = step_lib.make_optimizer(1e-3, warmup_steps=0, weight_decay=0.0,
                             clip_norm=1.0)
  params = {"w": jnp.zeros((4,))}
  _, state = opt.update({"w": jnp.full((4,), 100.0)}, opt.init(params), params)
  mu = optax.tree.get(state, "mu")
  np.testing.assert_allclose(optax.tree.norm(mu), (1 - 0.9) * 1.0, rtol=1e-5)


# -- RETROfit subsets and gradient accumulation (train_step level) ------------
def _tiny_setup(trainable="all"):
  cfg = RetroConfig.preset("tiny", vocab_size=128, num_layers=2,
                           cca_layers=(2,), enc_num_layers=1)
  model = Retro(cfg)
  opt = step_lib.make_optimizer(1e-2, warmup_steps=0)
  rng = np.random.default_rng(0)
  batch = {"tokens": jnp.asarray(rng.integers(1, 128, (4, 128)), jnp.int32),
           "neighbours": jnp.asarray(rng.integers(1, 128, (4, 2, 2, 128)),
                                     jnp.int32)}
  state = jax.jit(
      lambda r, b: step_lib.init_state(model, opt, r, b, trainable))(
          jax.random.key(0), batch)
  return model, opt, batch, state


def test_split_params_names_retrieval_modules():
  _, _, _, state = _tiny_setup()
  trained, frozen = step_lib.split_params(state.params, "retrieval")
  assert trained and frozen
  assert all("cca" in m or "encoder" in m for m in trained)
  assert not any("cca" in m or "encoder" in m for m in frozen)
  assert step_lib.split_params(state.params, "all") == (state.params, {})
  with pytest.raises(ValueError, match="trainable must be one of"):
    step_lib.split_params(state.params, "cca")


@pytest.mark.slow
def test_retrieval_step_leaves_frozen_bits_and_moves_cca():
  model, opt, batch, state = _tiny_setup("retrieval")
  before = jax.device_get(state.params)
  step = jax.jit(lambda s, b: step_lib.train_step(model, opt, s, b,
                                               "retrieval"))
  for _ in range(2):
    state, _ = step(state, batch)
  after = jax.device_get(state.params)
  for module in before:
    for name in before[module]:
      same = np.array_equal(before[module][name], after[module][name])
      assert same != step_lib.is_retrieval_module(module), (module, name)
  # Adam moments exist for the trained subset only, sharded like it.
  mu = optax.tree.get(state.opt_state, "mu")
  assert set(mu) == set(step_lib.split_params(before, "retrieval")[0])


@pytest.mark.slow
def test_accumulated_step_equals_whole_batch_step():
  # Plain SGD: the update is the gradient itself (Adam's first step is
  # sign(g) * lr, which turns rounding of near-zero gradients into lr).
  model, _, batch, state = _tiny_setup()
  opt = optax.sgd(1.0)
  state = state._replace(opt_state=opt.init(state.params))
  one, m1 = jax.jit(lambda s, b: step_lib.train_step(model, opt, s, b))(
      state, batch)
  _, _, _, state = _tiny_setup()
  state = state._replace(opt_state=opt.init(state.params))
  two, m2 = jax.jit(lambda s, b: step_lib.train_step(
      model, opt, s, b, accum_steps=2))(state, batch)
  np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
  np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-4)
  for a, b in zip(jax.tree_util.tree_leaves(one.params),
                  jax.tree_util.tree_leaves(two.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_retrieval_lr_scale_multiplies_only_retrieval_updates():
  """The first AdamW step moves every weight by about lr; with the scale,
  CCA and encoder weights move `scale` times as far, the rest as before."""
  model, _, batch, state = _tiny_setup()
  moved = {}
  for scale in (1.0, 3.0):
    opt = step_lib.make_optimizer(1e-2, warmup_steps=0, weight_decay=0.0,
                                  retrieval_lr_scale=scale)
    s = step_lib.TrainState(state.params, opt.init(state.params), state.step)
    new, _ = jax.jit(lambda s, b, o=opt: step_lib.train_step(model, o, s, b))(
        s, batch)
    moved[scale] = jax.tree.map(lambda a, b: np.asarray(a - b), new.params,
                                state.params)
  for module in moved[1.0]:
    for name, d1 in moved[1.0][module].items():
      d3 = moved[3.0][module][name]
      want = 3.0 if step_lib.is_retrieval_module(module) else 1.0
      np.testing.assert_allclose(d3, want * d1, rtol=1e-4, atol=1e-7,
                                 err_msg=f"{module}/{name}")
