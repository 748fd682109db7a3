"""Memory per device of a training run on a TPU slice, before renting it.

Parameters, optimizer state and gradients are exact: their shapes come from
`jax.eval_shape` and their per-device shards from the same sharding rules the
trainer uses, on an `AbstractMesh` (no devices needed). Activations are an
analytic estimate of what the backward pass keeps (below), per device.

Activation model (bytes per device; b = sequences per device per
micro-batch, n tokens, c bytes of the compute dtype, H·d heads x head width,
F the MLP width, heads / MLP / vocabulary split over the `model` axis):
  per decoder layer, per token, without remat:  c(4D + 4Hd + 2F) plus the
    attention probabilities (4 + c) bytes per computed query-key pair and
    head; CCA layers add c(D + 2Hd) and their probabilities;
  remat="dots": the layer input and the dense-projection outputs,
    c(2D + 4Hd + F) per token; attention is recomputed;
  remat="full": the layer input, c·D per token, plus one layer recomputed;
  plus the neighbour encoder (one pass over b·L·k·r tokens, kept whole),
  every CCA layer's keys and values of the neighbours, [b, L-1, k·r, 2, H,
  d], twice (as projected and heads-first; kept under any remat setting),
  and the float32 logits and their gradient, 8·V bytes per token.
Besides activations (`estimate`): with `fsdp` > 1 XLA gathers the
vocabulary matrices (embedding and output, [V, D]) whole in the compute
dtype, and with accumulation the summed gradient and the micro-batch's are
both live. These three terms were missing until compiling the step for TPU
ahead of time (`training/aot.py`, scripts/train_compile.py) showed them in
XLA's buffer assignment. XLA's buffer reuse and fusion still change the
truth by tens of percent either way: leave headroom (the table flags a
plan above 85% of HBM), or compile the step for the slice.
"""

from __future__ import annotations

import math
import re
from typing import Dict, Mapping, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh

from retro_jax.config import RetroConfig
from retro_jax.core import sharding
from retro_jax.model.flops import causal_score_pairs
from retro_jax.model.network import Retro
from retro_jax.training import step as step_lib

GIB = 2 ** 30
# Slice name prefix -> (TensorCores per JAX device in the name's count,
# HBM bytes per JAX device). v2/v3/v4/v5p names count TensorCores (2 per
# chip; a v4/v5p device is a chip, a v2/v3 device is a core); v5e and v6e
# names count chips.
TPU_GENERATIONS = {
    "v2": (1, 8 * GIB),
    "v3": (1, 16 * GIB),
    "v4": (2, 32 * GIB),
    "v5p": (2, 95 * GIB),
    "v5e": (1, 16 * GIB),
    "v5litepod": (1, 16 * GIB),
    "v6e": (1, 32 * GIB),
}
HEADROOM = 0.85


def parse_slice(name: str) -> Tuple[int, int]:
  """'v4-32' -> (16 devices, 32 GiB each); 'v5e-256' -> (256, 16 GiB)."""
  match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name.strip().lower())
  if not match or match.group(1) not in TPU_GENERATIONS:
    raise ValueError(f"unknown TPU slice {name!r}; expected <generation>-"
                     f"<size> with generation in {sorted(TPU_GENERATIONS)}, "
                     f"e.g. v4-32, v5e-256")
  per_device, hbm = TPU_GENERATIONS[match.group(1)]
  cores = int(match.group(2))
  if cores % per_device:
    raise ValueError(f"{name}: size must be a multiple of {per_device}")
  return cores // per_device, hbm


def abstract_mesh(axes: Mapping[str, int], num_devices: int) -> AbstractMesh:
  sizes = sharding.mesh_shape(axes, num_devices)
  # Auto axes, as make_mesh builds the real mesh: jax after 0.11.0 makes an
  # AbstractMesh without axis_types Explicit.
  auto = (jax.sharding.AxisType.Auto,) * len(sharding.MESH_AXES)
  return AbstractMesh(sizes, sharding.MESH_AXES, axis_types=auto)


def _shard_bytes(leaf, spec, mesh) -> int:
  shape = list(leaf.shape)
  for i, entry in enumerate(tuple(spec)[:len(shape)]):
    names = (entry,) if isinstance(entry, str) else tuple(entry or ())
    shape[i] //= math.prod(mesh.shape[a] for a in names)
  return math.prod(shape) * jnp.dtype(leaf.dtype).itemsize


def state_bytes(cfg: RetroConfig, mesh, trainable: str = "all"
                ) -> Dict[str, float]:
  """Exact per-device bytes of params, optimizer state and gradients."""
  model = Retro(cfg)
  optimizer = step_lib.make_optimizer(1e-4, 750, 10_000)
  tokens, neighbours = model.dummy_inputs()
  abstract, specs, _ = step_lib.state_specs(
      model, optimizer, mesh, {"tokens": tokens, "neighbours": neighbours},
      trainable=trainable)
  params = abstract.params
  trained, _ = step_lib.split_params(params, trainable)
  is_p = lambda x: isinstance(x, sharding.P)

  def total(tree, spec_tree):
    return sum(_shard_bytes(l, s, mesh) for l, s in zip(
        jax.tree_util.tree_leaves(tree),
        jax.tree_util.tree_leaves(spec_tree, is_leaf=is_p)))
  trained_specs, _ = step_lib.split_params(specs.params, trainable)
  return {"num_params": sum(math.prod(x.shape) for x in
                            jax.tree_util.tree_leaves(params)),
          "params": total(params, specs.params),
          "opt_state": total(abstract.opt_state, specs.opt_state),
          "grads": total(trained, trained_specs)}


def activation_bytes(cfg: RetroConfig, mesh, batch_size: int, seq_len: int,
                     accum_steps: int = 1) -> float:
  """Estimated per-device activation bytes of one train step (see top)."""
  shape = mesh.shape
  data = shape["data"] * shape["fsdp"]
  b = max(batch_size // accum_steps // data, 1)
  mp = shape["model"]
  c = jnp.dtype(cfg.compute_dtype).itemsize
  n, m, k, r = seq_len, cfg.chunk_size, cfg.num_neighbours, cfg.neighbour_len
  l = n // m
  d, hd, f = cfg.d_model, cfg.num_heads * cfg.head_dim / mp, cfg.d_ff / mp
  heads = cfg.num_heads / mp
  tokens = b * n
  probs = b * heads * causal_score_pairs(n, cfg.attention_block) * (4 + c)
  layer = tokens * c * (4 * d + 4 * hd + 2 * f) + probs       # No remat.
  cca_extra = tokens * c * (d + 2 * hd) + b * l * heads * m * k * r * (4 + c)
  n_cca = len(cfg.cca_layers)
  n_plain = cfg.num_layers - n_cca
  if cfg.remat == "full":
    kept = cfg.num_layers * tokens * c * d + layer + cca_extra
  elif cfg.remat == "dots":
    kept = (cfg.num_layers * tokens * c * (2 * d + 4 * hd + f)
            + n_cca * cca_extra + probs)
  else:
    kept = n_plain * layer + n_cca * (layer + cca_extra)
  if n_cca:
    kv = b * (l - 1) * k * r * 2 * hd * c                    # [b,L-1,kr,2,Hd]
    kept += n_cca * 2 * kv
    e = cfg.enc_d_model
    ehd = cfg.enc_num_heads * cfg.enc_head_dim / mp
    enc_tokens = b * l * k * r
    kept += cfg.enc_num_layers * (
        enc_tokens * c * (4 * e + 4 * ehd + 2 * cfg.enc_d_ff / mp)
        + b * l * k * (cfg.enc_num_heads / mp) * r * r * (4 + c))
  kept += tokens * 8 * cfg.vocab_size / mp                     # Logits.
  return float(kept)


def gathered_bytes(cfg: RetroConfig, mesh) -> float:
  """The vocabulary matrices ([V, D] embedding, [D, V] output; one when
  tied) that XLA all-gathers whole, in the compute dtype, when `fsdp`
  splits their D (seen as bf16[128000, 896] and bf16[896, 128000] buffers
  of the 172M model with fsdp=16)."""
  fsdp, mp = mesh.shape["fsdp"], mesh.shape["model"]
  if fsdp == 1 or cfg.d_model % fsdp:
    return 0.0
  vocab = cfg.vocab_size / (mp if cfg.vocab_size % mp == 0 else 1)
  copies = 1 if cfg.tie_output else 2
  return float(copies * vocab * cfg.d_model
               * jnp.dtype(cfg.compute_dtype).itemsize)


def estimate(cfg: RetroConfig, mesh, batch_size: int, seq_len: int,
             accum_steps: int = 1, trainable: str = "all"
             ) -> Dict[str, float]:
  """Bytes per device by kind (`mesh` real or abstract): the exact state,
  gradients (twice with accumulation: the running sum and the micro-batch's),
  the activation estimate, the gathered vocabulary matrices, and `total`."""
  state = state_bytes(cfg, mesh, trainable)
  out = {"num_params": state["num_params"], "params": state["params"],
         "opt_state": state["opt_state"],
         "grads": state["grads"] * (2 if accum_steps > 1 else 1),
         "acts": activation_bytes(cfg, mesh, batch_size, seq_len,
                                  accum_steps),
         "gathered": gathered_bytes(cfg, mesh)}
  out["total"] = sum(out[k] for k in ("params", "opt_state", "grads", "acts",
                                      "gathered"))
  return out


def plan(cfg: RetroConfig, slice_name: str, mesh_axes: Mapping[str, int],
         batch_size: int, seq_len: int, accum_steps: int = 1
         ) -> Dict[str, object]:
  """One row of the memory table: GiB per device by kind, and whether it
  fits the slice's HBM with headroom."""
  devices, hbm = parse_slice(slice_name)
  mesh = abstract_mesh(mesh_axes, devices)
  sharding.check_batch_divides(batch_size // accum_steps, mesh)
  est = estimate(cfg, mesh, batch_size, seq_len, accum_steps)
  return {"slice": slice_name, "devices": devices,
          "mesh": "x".join(str(mesh.shape[a]) for a in sharding.MESH_AXES),
          "num_params": est["num_params"],
          "params_gib": est["params"] / GIB,
          "opt_gib": est["opt_state"] / GIB,
          "grads_gib": est["grads"] / GIB,
          "acts_gib": est["acts"] / GIB,
          "gathered_gib": est["gathered"] / GIB,
          "total_gib": est["total"] / GIB,
          "hbm_gib": hbm / GIB, "fits": est["total"] <= HEADROOM * hbm}


def format_table(rows) -> str:
  """A Markdown table of `plan` rows (with a `preset` key added)."""
  head = ("| preset | slice | mesh d×f×m | params | params GiB | opt GiB | "
          "grads GiB | acts GiB (est.) | gathered GiB | total GiB | HBM GiB "
          "| fits |")
  lines = [head, "|" + "---|" * 12]
  for r in rows:
    lines.append(
        f"| {r['preset']} | {r['slice']} | {r['mesh']} | "
        f"{r['num_params'] / 1e6:,.0f}M | {r['params_gib']:.2f} | "
        f"{r['opt_gib']:.2f} | {r['grads_gib']:.2f} | {r['acts_gib']:.2f} | "
        f"{r['gathered_gib']:.2f} | {r['total_gib']:.2f} | "
        f"{r['hbm_gib']:.0f} | {'yes' if r['fits'] else 'no'} |")
  return "\n".join(lines)
