"""Building blocks of retro_jax.model.attention: RoPE, causal blocks, the matmul
and softmax-attention VJPs; CCA's masking and copy initialisation."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retro_jax.model import attention
from retro_jax.model import cross_attention


def test_rope_scores_depend_only_on_relative_position():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(1, 64)), jnp.float32)  # [1, K]
  k = jnp.asarray(rng.normal(size=(1, 64)), jnp.float32)  # [1, K]

  def score(i, j):
    qi = attention.rope(q, np.array([i]), 10000.0)
    kj = attention.rope(k, np.array([j]), 10000.0)
    return float(jnp.sum(qi * kj))

  assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-4, abs=1e-4)
  assert score(0, 0) == pytest.approx(float(jnp.sum(q * k)), rel=1e-5)
  assert score(7, 3) != pytest.approx(score(3, 7), rel=1e-3)
  # A rotation: norms are kept.
  rotated = attention.rope(q, np.array([250]), 10000.0)
  assert float(jnp.linalg.norm(rotated)) == pytest.approx(
      float(jnp.linalg.norm(q)), rel=1e-5)


def test_rope_traced_positions_equal_static_ones():
  x = jax.random.normal(jax.random.key(0), (2, 3, 5, 32))  # [B, H, T, K]
  pos = np.array([0, 4, 9, 63, 17])
  static = attention.rope(x, pos, 500.0)
  traced = jax.jit(lambda x, p: attention.rope(x, p, 500.0, 64))(
      x, jnp.asarray(pos))
  # Same table rows; only FMA contraction under jit differs.
  np.testing.assert_allclose(static, traced, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="num_positions"):
    jax.jit(lambda p: attention.rope(x, p, 500.0))(jnp.asarray(pos))


def test_rope_angles_are_constants_not_per_element_cosines():
  """The angles' cos/sin must not be computed inside the compiled graph:
  fused into their consumers they are re-evaluated for every element."""
  x = jnp.ones((2, 4, 128, 64))  # [B, H, T, K]
  hlo = jax.jit(lambda x: attention.rope(x, np.arange(128), 1e4)).lower(
      x).compile().as_text()
  assert "cosine(" not in hlo and "sine(" not in hlo


def test_causal_attend_blocks_equal_one_masked_product():
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 3, 256, 16)), jnp.float32)
             for _ in range(3))  # [B, H, T, K]
  mask = np.tril(np.ones((256, 256), bool))
  full = attention.attend(q, k, v, bias=jnp.where(mask, 0.0, -1e30))
  for block in (64, 128, 100):  # 100 does not divide T: one block.
    np.testing.assert_allclose(attention.causal_attend(q, k, v, block), full,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [((48, 8), (8, 24)), ((8, 48), (48, 4))])
def test_matmul_gradients_equal_plain_dot(shape):
  xs, ws = shape
  x = jax.random.normal(jax.random.key(2), xs)
  w = jax.random.normal(jax.random.key(3), ws)
  g = jax.random.normal(jax.random.key(4), (xs[0], ws[1]))
  ours = jax.vjp(attention.matmul, x, w)[1](g)
  plain = jax.vjp(jnp.matmul, x, w)[1](g)
  for a, b in zip(ours, plain):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _reference_attend(q, k, v, bias, key_valid):
  logits = jnp.einsum("...tk,...sk->...ts", q, k) + bias
  logits = jnp.where(key_valid[..., None, None, :], logits, -1e30)
  out = jnp.einsum("...ts,...sk->...tk", jax.nn.softmax(logits), v)
  return out * jnp.any(key_valid, -1)[..., None, None, None]


def test_attend_gradients_equal_autodiff_of_plain_softmax():
  rng = np.random.default_rng(5)
  q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32)
             for s in ((3, 2, 6, 8), (3, 2, 10, 8), (3, 2, 10, 8)))
  bias = jnp.asarray(rng.normal(size=(6, 10)), jnp.float32)  # [T, S]
  key_valid = jnp.asarray(rng.random((3, 10)) < 0.6).at[1].set(False)
  g = jnp.asarray(rng.normal(size=(3, 2, 6, 8)), jnp.float32)
  ours, ours_vjp = jax.vjp(
      lambda q, k, v: attention.attend(q, k, v, bias, key_valid), q, k, v)
  ref, ref_vjp = jax.vjp(
      lambda q, k, v: _reference_attend(q, k, v, bias, key_valid), q, k, v)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
  assert not np.any(np.asarray(ours[1]))  # Row 1 has no valid key.
  for a, b in zip(ours_vjp(g), ref_vjp(g)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_cca_reads_nothing_from_padding_and_copy_init_reads_values_whole():
  """CCA (cross_attention.py): neighbours that are all padding add exactly
  zero; with copy_init and all-equal scores (w_q zero), every attending
  position gets the plain mean of the valid encoded neighbour tokens."""
  b, l, m, k, r, d = 1, 2, 4, 2, 8, 8
  fn = hk.without_apply_rng(hk.transform(
      lambda x, enc, valid: cross_attention.ChunkedCrossAttention(
          2, 4, m, 10_000.0, copy_init=True, qk_bias=True, name="cca")(
              x, enc, valid)))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(b, l * m, d)), jnp.float32)
  enc = jnp.asarray(rng.normal(size=(b, l, k, r, d)), jnp.float32)
  valid = np.ones((b, l, k, r), bool)
  valid[0, 1, 1, 3:] = False
  params = fn.init(jax.random.key(0), x, enc, valid)
  none = fn.apply(params, x, enc, np.zeros_like(valid))
  assert np.all(np.asarray(none) == 0)
  flat = dict(params["cca"], w_q=jnp.zeros_like(params["cca"]["w_q"]),
              b_q=jnp.zeros_like(params["cca"]["b_q"]))
  out = np.asarray(fn.apply({"cca": flat}, x, enc, valid))  # [B, N, D]
  want = [np.asarray(enc[0, u])[valid[0, u]].mean(0) for u in range(l)]
  # Chunk u's neighbours reach positions u*m + m - 1 ... u*m + 2m - 2.
  np.testing.assert_allclose(out[0, m - 1], want[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out[0, 2 * m - 1], want[1], rtol=1e-5,
                             atol=1e-5)
  assert np.all(out[0, :m - 1] == 0)
