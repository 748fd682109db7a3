"""The fused attention path (retro_jax/model/fused_attention.py) against the
reference one (attention.attend / causal_attend): the same parameters, the
same function, per layer and for the whole network.

On CPU the fused path runs jax.nn.dot_product_attention with
implementation="xla"; the cuDNN call differs only in the mask's shape, which
`test_cudnn_gets_a_key_mask_of_the_full_query_length` checks by standing in
for the kernel.
"""

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from retro_jax import Retro, RetroConfig
from retro_jax.model import attention
from retro_jax.model import cross_attention
from retro_jax.model import fused_attention
from retro_jax.training import run_config
from conftest import random_neighbours, random_tokens

H, K = 2, 16  # Heads and head width of the layer tests.


@pytest.fixture
def fused_calls(monkeypatch):
  """Counts the calls of jax.nn.dot_product_attention (at trace time), so a
  test sees that the fused path was taken at all."""
  real, calls = jax.nn.dot_product_attention, []

  def counted(*args, **kwargs):
    calls.append(kwargs.get("implementation"))
    return real(*args, **kwargs)

  monkeypatch.setattr(jax.nn, "dot_product_attention", counted)
  return calls


# -- the layers, fused vs reference -------------------------------------------
def _causal_self(impl):
  # block=16 over T=48: the reference path skips key blocks.
  def fn(x):
    return attention.SelfAttention(H, K, causal=True, rope_base=1e4,
                                   block=16, attention=impl, name="sa")(x)

  def inputs(rng):
    return (rng.normal(size=(2, 48, 32)),), ()
  return fn, inputs, None


def _encoder_self(impl):
  def fn(x, valid):
    return attention.SelfAttention(H, K, causal=False, rope_base=1e4,
                                   attention=impl, name="sa")(x, valid)

  def inputs(rng):
    valid = rng.random((6, 24)) < 0.7
    valid[[1, 4]] = False  # Neighbours that are all padding.
    return (rng.normal(size=(6, 24, 32)),), (valid,)
  # Rows 1 and 4 have no valid key: their outputs are exactly 0.
  return fn, inputs, lambda out: out[np.array([1, 4])]


def _cca(impl):
  m = 8

  def fn(x, enc, valid):
    return cross_attention.ChunkedCrossAttention(
        H, K, m, 1e4, qk_bias=True, attention=impl, name="cca")(x, enc, valid)

  def inputs(rng):
    valid = rng.random((2, 4, 2, 12)) < 0.7  # [B, L, k, r]
    valid[0, 1] = False  # Chunk 1 of row 0 has no neighbour.
    return (rng.normal(size=(2, 32, 32)),  # [B, N, D]
            rng.normal(size=(2, 4, 2, 12, 24))), (valid,)  # [B, L, k, r, E]
  # Chunk u's neighbours reach positions u*m + m - 1 ... u*m + 2m - 2.
  return fn, inputs, lambda out: out[0, 2 * m - 1:3 * m - 1]


def _neighbour_cross(impl):
  def fn(x, ctx):
    return cross_attention.NeighbourCrossAttention(
        H, K, attention=impl, name="xa")(x, ctx)

  def inputs(rng):
    return (rng.normal(size=(2, 3, 24, 24)),  # [B, L, kr, E]
            rng.normal(size=(2, 3, 8, 32))), ()  # [B, L, m, D]
  return fn, inputs, None


LAYERS = {"causal_self_attention": _causal_self,
          "encoder_self_attention": _encoder_self,
          "cca": _cca, "neighbour_cross_attention": _neighbour_cross}


def _host_params(shapes, seed=2):
  """Random parameters of `shapes` (init's, from eval_shape) drawn on the
  host, std 1/sqrt(fan in): no init to compile."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda a: jnp.asarray(rng.normal(size=a.shape) / np.sqrt(
          a.shape[0] if a.ndim > 1 else 1), jnp.float32), shapes)


def _run(kind, impl, dtype, params=None):
  """(out, grads w.r.t. (params, float inputs), params, zero rows) of one
  layer: the gradient of sum(out * g) for a fixed random g."""
  make = LAYERS[kind]
  fn, inputs, zero_rows = make(impl)
  rng = np.random.default_rng(0)
  floats, masks = inputs(rng)
  floats = tuple(jnp.asarray(a, dtype) for a in floats)
  f = hk.without_apply_rng(hk.transform(fn))
  if params is None:
    params = _host_params(jax.eval_shape(f.init, jax.random.key(0), *floats,
                                         *masks))
  out_shape = jax.eval_shape(f.apply, params, *floats, *masks).shape
  g = jnp.asarray(np.random.default_rng(1).normal(size=out_shape),
                  jnp.float32)

  def loss(p, *xs):
    out = f.apply(p, *xs, *masks)
    return jnp.sum(out.astype(jnp.float32) * g), out

  (_, out), grads = jax.jit(jax.value_and_grad(
      loss, argnums=tuple(range(1 + len(floats))), has_aux=True))(
          params, *floats)
  return out, grads, params, zero_rows


def _max_diffs(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.max(np.abs(a - b))), float(np.max(np.abs(b)))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_layer_fused_equals_reference(kind, dtype, fused_calls):
  dt = jnp.dtype(dtype)
  ref, ref_grads, params, zero_rows = _run(kind, "reference", dt)
  assert not fused_calls
  fused, fused_grads, _, _ = _run(kind, "xla", dt, params)
  assert fused_calls and set(fused_calls) == {"xla"}
  assert fused.dtype == ref.dtype == dt
  # float32: the same products up to summation order. bfloat16: both
  # compute logits and softmax in float32, but round activations and the
  # gradients of the two backward passes (custom VJP, autodiff) to bf16.
  rel = 1e-5 if dtype == "float32" else 3e-2
  pairs = [("out", fused, ref)] + [
      (jax.tree_util.keystr(path), a, b) for (path, a), b in zip(
          jax.tree_util.tree_leaves_with_path(fused_grads),
          jax.tree_util.tree_leaves(ref_grads))]
  assert len(pairs) > 3
  for name, a, b in pairs:
    diff, scale = _max_diffs(a, b)
    assert scale > 0, name
    assert diff <= rel * scale, f"{kind} {dtype} {name}: {diff} vs {scale}"
  if zero_rows is not None:  # Queries without a valid key: exactly 0.
    assert np.all(np.asarray(zero_rows(ref), np.float32) == 0)
    assert np.all(np.asarray(zero_rows(fused), np.float32) == 0)
    assert np.any(np.asarray(fused, np.float32) != 0)


def test_rope_token_major_equals_head_major():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 10, 3, 8)),
                  jnp.float32)  # [B, T, H, K]
  pos = np.arange(3, 13)
  token_major = attention.rope(x, pos, 1e4, seq_axis=-3)
  head_major = attention.rope(jnp.swapaxes(x, 1, 2), pos, 1e4)  # [B,H,T,K]
  np.testing.assert_array_equal(token_major, jnp.swapaxes(head_major, 1, 2))


def test_cudnn_gets_a_key_mask_of_the_full_query_length(monkeypatch):
  """cuDNN (jax 0.10.2) turns the mask into a bias whose last two dims must
  be (T, S): the key mask [B', S] is broadcast to [B', 1, T, S] there; the
  xla path takes [B', 1, 1, S]. The kernel is stood in for by the xla one."""
  real = jax.nn.dot_product_attention
  seen = {}

  def stand_in(q, k, v, mask=None, **kw):
    seen[kw["implementation"]] = mask.shape
    return real(q, k, v, mask=mask, **dict(kw, implementation="xla"))

  monkeypatch.setattr(jax.nn, "dot_product_attention", stand_in)
  rng = np.random.default_rng(3)
  q = jnp.asarray(rng.normal(size=(2, 3, 5, H, K)), jnp.bfloat16)
  kv = jnp.asarray(rng.normal(size=(2, 3, 7, H, K)), jnp.bfloat16)
  valid = rng.random((2, 3, 7)) < 0.5
  valid[1, 2] = False
  outs = {impl: fused_attention.attend(q, kv, kv, impl, key_valid=valid)
          for impl in ("xla", "cudnn")}
  assert seen == {"xla": (6, 1, 1, 7), "cudnn": (6, 1, 5, 7)}
  np.testing.assert_array_equal(outs["cudnn"], outs["xla"])
  assert outs["xla"].shape == q.shape
  assert np.all(np.asarray(outs["xla"][1, 2], np.float32) == 0)


# -- the whole network ----------------------------------------------------------
N = 128  # 2 chunks of the tiny preset's m = 64.


def _net_loss_and_grads(cfg, params, tokens, neighbours):
  model = Retro(cfg)

  def loss(p):
    logits = model.apply(p, tokens, neighbours)
    lp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(lp, tokens[:, 1:, None], -1))

  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.slow  # Two gradient compilations of the tiny network: ~20 s.
def test_network_loss_and_grads_fused_equal_reference(tiny, fused_calls):
  tokens = random_tokens(tiny, 1, N, seed=5)
  neighbours = random_neighbours(tiny, 1, N, seed=6)
  neighbours[0, 0, 1, 70:] = 0  # Padding inside a neighbour,
  neighbours[0, 1] = 0          # and a chunk without any.
  ref_cfg = tiny.replace(attention="reference")
  params = _host_params(jax.eval_shape(Retro(ref_cfg).init,
                                       jax.random.key(0), tokens, neighbours))
  loss0, grads0 = _net_loss_and_grads(ref_cfg, params, tokens, neighbours)
  assert not fused_calls
  loss1, grads1 = _net_loss_and_grads(tiny.replace(attention="xla"), params,
                                      tokens, neighbours)
  assert len(fused_calls) == 9  # 4 decoder, 2 CCA, 3 encoder layers.
  np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
  flat0 = jax.tree_util.tree_leaves_with_path(grads0)
  flat1 = jax.tree_util.tree_leaves(grads1)
  assert len(flat0) == len(flat1)
  for (path, g0), g1 in zip(flat0, flat1):
    np.testing.assert_allclose(g1, g0, rtol=1e-4, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))


def test_network_fused_is_causal_and_equals_reference(tiny, fused_calls):
  """Changing token t changes no logit before t on the fused path (as
  tests/model/test_model.py checks on the reference one); its logits are
  the reference path's."""
  tokens = random_tokens(tiny, 1, N, seed=0)
  neighbours = random_neighbours(tiny, 1, N, seed=1)
  ts = [0, 1, 37, 63, 64, 100, 127]
  rows = [tokens[0]]
  for t in ts:
    row = tokens[0].copy()
    row[t] = row[t] % (tiny.vocab_size - 1) + 1   # Another non-pad id.
    rows.append(row)
  batch = np.stack(rows)
  nbs = np.repeat(neighbours, len(rows), axis=0)
  fused = Retro(tiny.replace(attention="xla"))
  params = _host_params(jax.eval_shape(fused.init, jax.random.key(0), tokens,
                                       neighbours))
  del fused_calls[:]
  logits = np.asarray(jax.jit(fused.apply)(params, batch, nbs))
  # Every attention layer fused: 4 decoder self-attentions, 2 CCAs, 2
  # encoder self-attentions and 1 encoder cross-attention.
  assert fused_calls == ["xla"] * 9
  for i, t in enumerate(ts, start=1):
    np.testing.assert_allclose(logits[i, :t], logits[0, :t], rtol=1e-5,
                               atol=1e-5,
                               err_msg=f"token {t} changed earlier logits")
    assert np.max(np.abs(logits[i, t] - logits[0, t])) > 1e-3, t
  ref = jax.jit(Retro(tiny.replace(attention="reference")).apply)(
      params, tokens, neighbours)  # [1, N, V]
  np.testing.assert_allclose(logits[0], ref[0], rtol=1e-5, atol=1e-5)


# -- configuration --------------------------------------------------------------
def test_auto_resolves_to_reference_on_cpu_and_cudnn_only_where_it_fits(
    monkeypatch, tiny):
  assert jax.default_backend() == "cpu"
  assert not fused_attention.on_nvidia_gpu()
  assert fused_attention.resolve("auto", "bfloat16", (64, 64)) == "reference"
  assert fused_attention.resolve_config(tiny) == "reference"
  for impl in ("reference", "xla", "cudnn"):
    assert fused_attention.resolve(impl, "float32", (16,)) == impl
  with pytest.raises(ValueError, match="flash"):
    fused_attention.resolve("flash", "bfloat16", (64,))
  # As if on an NVIDIA GPU: cudnn for bf16 and head widths cuDNN takes.
  monkeypatch.setattr(fused_attention, "on_nvidia_gpu", lambda: True)
  assert fused_attention.resolve("auto", "bfloat16", (64, 128)) == "cudnn"
  assert fused_attention.resolve("auto", "float32", (64,)) == "reference"
  assert fused_attention.resolve("auto", "bfloat16", (64, 12)) == "reference"
  assert fused_attention.resolve("auto", "bfloat16", (256,)) == "reference"


def test_config_validates_attention(tiny):
  assert RetroConfig().attention == "auto"
  with pytest.raises(ValueError, match=r"RetroConfig\.attention"):
    tiny.replace(attention="flash")
  with pytest.raises(ValueError, match=r"RetroConfig\.attention.*bfloat16"):
    tiny.replace(attention="cudnn")  # float32 compute.
  assert tiny.replace(attention="cudnn",
                      compute_dtype="bfloat16").attention == "cudnn"


def test_resuming_with_another_attention_is_not_refused(tmp_path, tiny):
  old = {k: v for k, v in tiny.to_dict().items() if k != "attention"}
  assert RetroConfig.from_dict(old) == tiny  # A config saved before it.
  now = tiny.replace(attention="xla").to_dict()
  assert run_config.model_differences(old, now) == []
  assert run_config.model_differences(
      tiny.to_dict(), tiny.replace(attention="cudnn",
                                   compute_dtype="bfloat16").to_dict()) == [
                                       "compute_dtype: saved 'float32', "
                                       "now 'bfloat16'"]
  saved = ml_collections.ConfigDict({"model": old})
  run_config.save_run_config(str(tmp_path), saved)
  run_config.check_same_model(
      str(tmp_path), ml_collections.ConfigDict({"model": now}))
  with pytest.raises(ValueError, match="d_model"):
    run_config.check_same_model(str(tmp_path), ml_collections.ConfigDict(
        {"model": tiny.replace(attention="xla", d_model=32).to_dict()}))
