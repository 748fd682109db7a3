"""Behavioural tests of the RETRO network (retro_jax.model: network, stack,
layers, attention).

Every check compares the model with itself under a controlled change of its
inputs (or with a closed form derived from the config), so it fails when the
model is wrong rather than when a number drifts. Perturbations are stacked
along the batch axis: batch rows never interact, so one forward pass tests
many of them at once.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import retro_jax
from retro_jax import count_params, Retro, RetroConfig
from retro_jax.config import PAPER_TABLE2_M
from retro_jax.model.layers import gelu
from conftest import random_neighbours, random_tokens

N = 256            # 4 chunks of m = 64.
TIGHT = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def setup(tiny):
  """(model, params, jitted apply, tokens [1, N], neighbours [1, 4, k, r])."""
  model = Retro(tiny)
  tokens = random_tokens(tiny, 1, N, seed=0)
  neighbours = random_neighbours(tiny, 1, N, seed=1)
  params = jax.jit(model.init)(jax.random.key(0), tokens, neighbours)
  return model, params, jax.jit(model.apply), tokens, neighbours


def _pos_diff(a, b):
  """Per-position max |a - b| over the vocabulary: [N]."""
  return np.max(np.abs(np.asarray(a) - np.asarray(b)), axis=-1)


# -- causality and where retrieval acts ---------------------------------------
def test_causal_in_tokens(setup, tiny):
  _, params, apply, tokens, neighbours = setup
  # Positions inside chunks (not only at boundaries) catch a wrong CCA shift:
  # unshifted, chunk u's neighbours (encoded with chunk u's activations) would
  # reach positions u*m .. u*m + m - 2, before the tokens they were built from.
  ts = [0, 1, 37, 63, 64, 100, 127, 128, 200, 255]
  rows = [tokens[0]]
  for t in ts:
    row = tokens[0].copy()
    row[t] = row[t] % (tiny.vocab_size - 1) + 1   # Another non-pad id.
    rows.append(row)
  batch = np.stack(rows)
  nbs = np.repeat(neighbours, len(rows), axis=0)
  logits = np.asarray(apply(params, batch, nbs))  # [1 + len(ts), N, V]
  for i, t in enumerate(ts, start=1):
    np.testing.assert_allclose(logits[i, :t], logits[0, :t], **TIGHT,
                               err_msg=f"token {t} changed earlier logits")
    assert _pos_diff(logits[i, t], logits[0, t]) > 1e-3, (
        f"changing token {t} left its own logits unchanged")


@pytest.mark.parametrize("u", [0, 1, 2, 3])
def test_neighbours_act_from_last_token_of_their_chunk(setup, tiny, u):
  _, params, apply, tokens, neighbours = setup
  m = tiny.chunk_size
  other = neighbours.copy()
  other[:, u] = random_neighbours(tiny, 1, N, seed=100 + u)[:, u]
  logits = np.asarray(apply(params, np.repeat(tokens, 2, 0),
                            np.concatenate([neighbours, other])))
  first = (u + 1) * m - 1   # The last token of chunk u.
  np.testing.assert_allclose(logits[1, :first], logits[0, :first], **TIGHT,
                             err_msg=f"neighbours of chunk {u} leaked early")
  diff = _pos_diff(logits[1, first:], logits[0, first:])  # [N - first]
  assert np.all(diff > 1e-3), (
      f"neighbours of chunk {u} did not change positions "
      f"{first + np.flatnonzero(diff <= 1e-3)}")


def test_all_padding_neighbours_equal_retrieval_off(setup, tiny):
  _, params, apply, tokens, neighbours = setup
  off = np.asarray(apply(params, tokens, None))
  zeros = np.asarray(apply(params, tokens, np.zeros_like(neighbours)))
  # CCA adds exactly zero for a chunk without neighbours; only float fusion
  # differences between the two compiled programs are allowed.
  np.testing.assert_allclose(zeros, off, rtol=1e-6, atol=1e-6)
  on = np.asarray(apply(params, tokens, neighbours))
  assert np.max(np.abs(on - off)) > 1e-3, "retrieval has no effect at all"


@pytest.mark.slow
def test_skipping_last_position_retrieval_equals_padding_last_chunk(
    setup, tiny):
  """retrieve_for_last_position=False is the model with the last chunk's
  neighbours as padding: the same logits everywhere, and those neighbours
  reached only the last position."""
  model, params, _, tokens, neighbours = setup
  skip = jax.jit(lambda p, t, nb: model.apply(
      p, t, nb, retrieve_for_last_position=False))
  full = np.asarray(model.apply(params, tokens, neighbours))
  padded = neighbours.copy()
  padded[:, -1] = 0
  want = np.asarray(model.apply(params, tokens, padded))
  got = np.asarray(skip(params, tokens, neighbours))
  np.testing.assert_allclose(got, want, **TIGHT)
  np.testing.assert_allclose(got[:, :-1], full[:, :-1], **TIGHT)
  assert _pos_diff(got[0, -1], full[0, -1]) > 1e-3, (
      "the last chunk's neighbours did not reach the last position")
  # One chunk: no neighbour reaches any position, i.e. retrieval off.
  one = tokens[:, :tiny.chunk_size]
  np.testing.assert_allclose(
      np.asarray(skip(params, one, neighbours[:, :1])),
      np.asarray(model.apply(params, one, None)), **TIGHT)


@pytest.mark.slow
def test_zero_init_cca_starts_as_the_baseline(tiny):
  """With zero-initialised CCA outputs a fresh RETRO computes its baseline:
  the logits ignore the neighbours, and the first gradient reaches the CCA
  output projections but nothing upstream of them (encoder, CCA q/kv)."""
  cfg = tiny.replace(zero_init_cca=True)
  model = Retro(cfg)
  tokens = random_tokens(cfg, 2, N, seed=3)
  neighbours = random_neighbours(cfg, 2, N, seed=4)
  params = jax.jit(model.init)(jax.random.key(0), tokens, neighbours)
  on = np.asarray(model.apply(params, tokens, neighbours))
  off = np.asarray(model.apply(params, tokens, None))
  np.testing.assert_allclose(on, off, rtol=1e-6, atol=1e-6)

  def loss(p):
    logits = model.apply(p, tokens, neighbours)
    return -jnp.mean(jnp.take_along_axis(
        jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], -1))

  grads = jax.grad(loss)(params)
  cca = [m for m in grads if m.endswith("/cca")]
  assert len(cca) == len(cfg.cca_layers)
  for m in cca:
    assert np.all(np.asarray(params[m]["w_o"]) == 0)
    assert np.max(np.abs(grads[m]["w_o"])) > 0, f"{m}/w_o gets no gradient"
    assert np.max(np.abs(grads[m]["w_q"])) == 0
  enc = [m for m in grads if "encoder/" in m]
  assert enc and all(np.max(np.abs(leaf)) == 0
                     for m in enc for leaf in grads[m].values())
  # Once w_o moves, the neighbours act again.
  moved = jax.tree_util.tree_map(lambda p, g: p - 0.1 * jnp.sign(g),
                                 params, grads)
  on = np.asarray(model.apply(moved, tokens, neighbours))
  off = np.asarray(model.apply(moved, tokens, None))
  assert np.max(np.abs(on - off)) > 1e-3


def test_padding_chunk_zero_only(setup, tiny):
  """Chunk 0 without neighbours: retrieval-off logits up to where chunk 1's
  neighbours first act (position 2m - 1), different from there on."""
  _, params, apply, tokens, neighbours = setup
  m = tiny.chunk_size
  nb = neighbours.copy()
  nb[:, 0] = 0
  off = np.asarray(apply(params, tokens, None))
  logits = np.asarray(apply(params, tokens, nb))
  np.testing.assert_allclose(logits[:, :2 * m - 1], off[:, :2 * m - 1], **TIGHT)
  assert _pos_diff(logits[0, 2 * m - 1], off[0, 2 * m - 1]) > 1e-3


def test_extra_padding_neighbours_and_tokens_are_masked(setup, tiny):
  """Appending an all-padding neighbour (k -> k + 1), or padding at the end of
  every neighbour (r -> r + 16), must not change any logit."""
  _, params, apply, tokens, neighbours = setup
  base = np.asarray(apply(params, tokens, neighbours))
  more_k = np.pad(neighbours, ((0, 0), (0, 0), (0, 1), (0, 0)))
  more_r = np.pad(neighbours, ((0, 0), (0, 0), (0, 0), (0, 16)))
  for name, nb in (("k + 1", more_k), ("r + 16", more_r)):
    np.testing.assert_allclose(np.asarray(apply(params, tokens, nb)),
                               base, **TIGHT, err_msg=name)


# -- validation ----------------------------------------------------------------
def test_bad_inputs_raise(setup, tiny):
  model, params, _, tokens, neighbours = setup
  with pytest.raises(ValueError, match="multiple of the chunk size"):
    model.apply(params, tokens[:, :100], None)
  with pytest.raises(ValueError, match=r"neighbours must be \[batch"):
    model.apply(params, tokens, neighbours[:, :, 0])           # Rank 3.
  with pytest.raises(ValueError, match=r"neighbours must be \[batch"):
    model.apply(params, tokens, neighbours[:, :3])              # 3 chunks.
  with pytest.raises(ValueError, match=r"neighbours must be \[batch"):
    model.apply(params, tokens, np.repeat(neighbours, 2, 0))    # Batch 2.


def test_bad_config_raises(tiny):
  with pytest.raises(ValueError, match="unknown RETRO preset 'huge'"):
    RetroConfig.preset("huge")
  with pytest.raises(ValueError, match=r"unknown RetroConfig field.*d_modle"):
    RetroConfig.from_dict({**tiny.to_dict(), "d_modle": 8})
  with pytest.raises(ValueError, match="unknown RetroConfig field"):
    RetroConfig.preset("tiny", n_layers=3)
  for bad in [(0,), (tiny.num_layers + 1,), (2, 9)]:
    with pytest.raises(ValueError, match=r"cca_layers.*\[1, 4\]"):
      tiny.replace(cca_layers=bad)


# -- parameter counts ------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(retro_jax.PRESETS))
def test_every_preset_builds(name):
  assert count_params(RetroConfig.preset(name)) > 0   # eval_shape: abstract.


@pytest.mark.parametrize("tie", [False, True])
def test_copy_init_reads_a_neighbour_token_as_its_own_logit(tiny, tie):
  """With `cca_copy_init`, CCA's value and output projections start as
  identities (and an untied output as the embedding's transpose): at
  initialisation, neighbours made of one token t raise t's logit above
  every other token's wherever they are read (from the chunk's last token
  on), which is what lets attention learn where to read from the first
  step."""
  cfg = tiny.replace(cca_copy_init=True, tie_output=tie)
  model = Retro(cfg)
  tokens = random_tokens(cfg, 3, N, seed=3)
  t = np.array([7, 100, 300])
  neighbours = np.broadcast_to(t[:, None, None, None], (3, N // 64, 2, 128))
  params = jax.jit(model.init)(jax.random.key(0), tokens, neighbours)
  for m in (m for m in params if m.endswith("/cca")):
    v = np.asarray(params[m]["w_kv"])[:, 1].reshape(cfg.d_model, -1)
    o = np.asarray(params[m]["w_o"]).reshape(-1, cfg.d_model)
    np.testing.assert_array_equal(v @ o, np.eye(cfg.d_model))
  on = np.asarray(model.apply(params, tokens, neighbours))
  off = np.asarray(model.apply(params, tokens, None))
  raised = np.argmax(on[:, 63:] - off[:, 63:], -1)  # [3, N - 63]
  assert (raised == t[:, None]).mean() > 0.5  # Chance: 1 in 512.
  # Without it the same neighbours raise no particular token.
  plain = Retro(tiny.replace(tie_output=tie))
  p2 = jax.jit(plain.init)(jax.random.key(0), tokens, neighbours)
  d2 = np.asarray(plain.apply(p2, tokens, neighbours)) - np.asarray(
      plain.apply(p2, tokens, None))
  assert (np.argmax(d2[:, 63:], -1) == t[:, None]).mean() < 0.05


def test_tied_output_logits_start_at_unit_scale(tiny):
  """A tied output divides by sqrt(D): at initialisation its logits are as
  large as an untied output's (std about 1), not sqrt(D) times larger."""
  tokens = random_tokens(tiny, 2, N, seed=5)
  for tie in (True, False):
    model = Retro(tiny.replace(tie_output=tie, cca_layers=()))
    params = jax.jit(model.init)(jax.random.key(1), tokens, None)
    std = float(np.std(np.asarray(model.apply(params, tokens, None))))
    assert 0.5 < std < 2.0, (tie, std)


def test_count_params_of_params_equals_config(setup, tiny):
  _, params, _, _, _ = setup
  assert count_params(params) == count_params(tiny)
  assert count_params(params, exclude_embeddings=True) == count_params(
      tiny, exclude_embeddings=True)


def baseline_closed_form(c: RetroConfig) -> int:
  """Non-embedding parameters of the decoder without retrieval."""
  d, hk = c.d_model, c.num_heads * c.head_dim
  layer = (3 * d * hk + hk * d          # self-attention w_qkv, w_o
           + 2 * d * c.d_ff             # MLP w_in, w_out (no biases)
           + 2 * d)                     # attn_norm, mlp_norm scales
  return c.num_layers * layer + d       # + final_norm


def retrieval_closed_form(c: RetroConfig) -> int:
  """Non-embedding parameters that retrieval adds: CCA layers + encoder."""
  d, e = c.d_model, c.enc_d_model
  hk, ehk = c.num_heads * c.head_dim, c.enc_num_heads * c.enc_head_dim
  cca = d * hk + 2 * e * hk + hk * d + d        # w_q, w_kv, w_o, cca_norm
  cca += 2 * hk if c.cca_qk_bias else 0         # b_q, b_k
  enc_layer = 4 * e * ehk + 2 * e * c.enc_d_ff + 2 * e
  cross = (e * ehk + 2 * d * ehk + ehk * e     # w_q, w_kv (from D), w_o
           + e + d)                             # cross_norm, context_norm
  proj = d * e if c.share_embeddings and e != d else 0   # enc_embed_proj
  return (len(c.cca_layers) * cca + c.enc_num_layers * enc_layer
          + len(c.enc_cross_attention_layers) * cross + e + proj)


def embeddings_closed_form(c: RetroConfig, retrieval: bool) -> int:
  n = c.vocab_size * c.d_model * (1 if c.tie_output else 2)
  if retrieval and not c.share_embeddings:
    n += c.vocab_size * c.enc_d_model
  return n


@pytest.mark.parametrize("name", ["tiny", "bench"] + list(PAPER_TABLE2_M))
def test_param_counts_match_closed_form(name):
  cfg = RetroConfig.preset(name)
  base_cfg = cfg.replace(cca_layers=())
  base = count_params(base_cfg, exclude_embeddings=True)
  retro = count_params(cfg, exclude_embeddings=True)
  assert base == baseline_closed_form(cfg)
  assert retro - base == retrieval_closed_form(cfg)
  assert count_params(cfg) == retro + embeddings_closed_form(cfg, True)
  assert count_params(base_cfg) == base + embeddings_closed_form(cfg, False)


def test_param_counts_near_paper_table2(capsys):
  rows, failures = [], []
  for name, (paper_base, paper_retro) in PAPER_TABLE2_M.items():
    cfg = RetroConfig.preset(name)
    ours_base = count_params(cfg.replace(cca_layers=()),
                             exclude_embeddings=True) / 1e6
    ours_retro = count_params(cfg, exclude_embeddings=True) / 1e6
    rows.append(f"{name:>6} | {paper_base:8.0f} {ours_base:8.1f} "
                f"({ours_base / paper_base - 1:+6.1%}) | {paper_retro:8.0f} "
                f"{ours_retro:8.1f} ({ours_retro / paper_retro - 1:+6.1%})")
    # The paper's relative-position parameters etc. are not in ours.
    for what, ours, paper in (("baseline", ours_base, paper_base),
                              ("RETRO", ours_retro, paper_retro)):
      if abs(ours / paper - 1) > 0.25:
        failures.append(f"{name} {what}: {ours:.1f}M vs paper {paper}M")
  with capsys.disabled():
    print("\nParameters without embeddings, millions (paper Table 2 vs ours)")
    print("preset |    paper     ours  (diff)  |    paper     ours  (diff)")
    print("       |        baseline            |          RETRO")
    print("\n".join(rows))
  assert not failures, failures


# -- precision and rematerialisation -------------------------------------------------
@pytest.mark.slow
def test_bfloat16_compute_close_to_float32(setup, tiny):
  _, params, apply, tokens, neighbours = setup
  f32 = np.asarray(apply(params, tokens, neighbours))
  bf16 = Retro(tiny.replace(compute_dtype="bfloat16")).apply(
      params, tokens, neighbours)
  assert bf16.dtype == jnp.float32
  bf16 = np.asarray(bf16)
  assert np.all(np.isfinite(bf16))
  # bf16 keeps ~3 significant digits: a few percent of the logits' spread.
  assert np.mean(np.abs(bf16 - f32)) < 0.05 * np.std(f32)
  assert np.mean(np.abs(bf16 - f32)) > 0, "compute_dtype had no effect"


@pytest.mark.slow   # Two gradient compilations each: ~15 s on 2 cores.
@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_same_logits_and_grads(setup, tiny, remat):
  _, params, _, tokens, neighbours = setup

  def loss_and_logits(cfg):
    model = Retro(cfg)

    def loss(p):
      logits = model.apply(p, tokens, neighbours)
      lp = jax.nn.log_softmax(logits[:, :-1])
      return -jnp.mean(jnp.take_along_axis(lp, tokens[:, 1:, None], -1)), logits

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  (loss0, logits0), grads0 = loss_and_logits(tiny)
  (loss1, logits1), grads1 = loss_and_logits(tiny.replace(remat=remat))
  np.testing.assert_allclose(logits1, logits0, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
  flat0 = jax.tree_util.tree_leaves_with_path(grads0)
  flat1 = jax.tree_util.tree_leaves(grads1)
  for (path, g0), g1 in zip(flat0, flat1):
    np.testing.assert_allclose(g1, g0, rtol=1e-4, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))


def test_bench_preset_logits_shape():
  cfg = RetroConfig.preset("bench")
  model = Retro(cfg)
  tokens = jax.ShapeDtypeStruct((2, 512), jnp.int32)
  nbs = jax.ShapeDtypeStruct((2, 512 // 64, 2, 128), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), tokens, nbs)
  out = jax.eval_shape(model.apply, params, tokens, nbs)
  assert out.shape == (2, 512, 8192) and out.dtype == jnp.float32


@pytest.mark.slow
def test_scanned_layers_equal_unrolled(tiny):
  """`scan_layers` stacks runs of plain layers; with the same weights it must
  compute exactly what the unrolled decoder computes."""
  cfg = tiny.replace(cca_layers=(4,))          # Layers 1-3 form one run.
  tokens = random_tokens(cfg, 2, N, seed=3)
  neighbours = random_neighbours(cfg, 2, N, seed=4)
  unrolled, scanned = Retro(cfg), Retro(cfg.replace(scan_layers=True))
  params = unrolled.init(jax.random.key(1), tokens, neighbours)
  stacked = {k: v for k, v in params.items()
             if not k.startswith(("decoder/layer_00", "decoder/layer_01",
                                  "decoder/layer_02"))}
  for key in params:
    if key.startswith("decoder/layer_00/"):
      sub = key[len("decoder/layer_00/"):]
      stacked["decoder/layers_00_02/" + sub] = jax.tree_util.tree_map(
          lambda *xs: jnp.stack(xs),
          *[params[f"decoder/layer_{i:02d}/{sub}"] for i in range(3)])
  want = jax.eval_shape(scanned.init, jax.random.key(1), tokens, neighbours)
  assert (jax.tree_util.tree_map(lambda a: a.shape, want)
          == jax.tree_util.tree_map(lambda a: a.shape, stacked))
  np.testing.assert_allclose(scanned.apply(stacked, tokens, neighbours),
                             unrolled.apply(params, tokens, neighbours),
                             rtol=1e-5, atol=1e-5)


def test_out_of_vocabulary_ids_raise(setup, tiny):
  model, params, _, tokens, neighbours = setup
  bad = tokens.copy()
  bad[0, 5] = tiny.vocab_size
  with pytest.raises(ValueError, match="tokens hold ids"):
    model.apply(params, bad, neighbours)
  bad_nb = neighbours.copy()
  bad_nb[0, 0, 0, 0] = -1
  with pytest.raises(ValueError, match="neighbours hold ids"):
    model.apply(params, tokens, bad_nb)


def test_gelu_value_and_gradient_equal_jax_nn_gelu():
  x = jnp.linspace(-8.0, 8.0, 4001)  # [n]
  g = jax.random.normal(jax.random.key(0), x.shape)  # [n]
  ours, ours_vjp = jax.vjp(gelu, x)
  ref, ref_vjp = jax.vjp(jax.nn.gelu, x)
  np.testing.assert_array_equal(ours, ref)
  np.testing.assert_allclose(ours_vjp(g)[0], ref_vjp(g)[0], rtol=1e-5,
                             atol=1e-5)
