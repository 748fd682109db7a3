"""The loss and optimizer of retro_jax.train, against direct computations."""

import jax.numpy as jnp
import numpy as np
import optax

from retro_jax import train


def test_cross_entropy_equals_direct_sum():
  rng = np.random.default_rng(0)
  b, n, v = 2, 8, 11
  logits = rng.standard_normal((b, n, v)).astype(np.float32)
  tokens = rng.integers(1, v, (b, n)).astype(np.int32)
  mask = (rng.random((b, n)) > 0.3).astype(np.float32)
  nll, count = train.cross_entropy(jnp.asarray(logits), jnp.asarray(tokens),
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


def test_schedule_warms_up_then_decays():
  opt = train.make_optimizer(1.0, warmup_steps=10, total_steps=100,
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
  opt = train.make_optimizer(1e-3, warmup_steps=0, weight_decay=0.0,
                             clip_norm=1.0)
  params = {"w": jnp.zeros((4,))}
  _, state = opt.update({"w": jnp.full((4,), 100.0)}, opt.init(params), params)
  mu = optax.tree.get(state, "mu")
  np.testing.assert_allclose(optax.tree.norm(mu), (1 - 0.9) * 1.0, rtol=1e-5)
