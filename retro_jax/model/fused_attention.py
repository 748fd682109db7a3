"""The fused attention path: `jax.nn.dot_product_attention`, token-major.

RETRO's attention has two implementations with the same parameters and the
same semantics (attention.py's module docstring):

  reference  attention.attend / causal_attend: head-major [..., H, T, K],
             a custom VJP and block-skipping causal attention, tuned for
             XLA:CPU and fine on TPU. The default there.
  xla        jax.nn.dot_product_attention(implementation="xla"): the plain
             softmax product in token-major [B, T, H, K], any backend.
  cudnn      the same call with implementation="cudnn": cuDNN's flash
             attention on NVIDIA GPUs (bf16/fp16 operands only).

`RetroConfig.attention` names one, or "auto": cudnn on an NVIDIA GPU with
bfloat16 compute and head widths cuDNN takes, reference anywhere else.
`resolve` runs when the network is traced, so a program compiled ahead of
time for a TPU on a CPU host (training/aot.py) gets the reference path.

Shape glossary:
  B: batch (leading dims of the layer flattened into it).
  T, S: query and key lengths.   H: heads.   K: head width.
"""

from __future__ import annotations

from typing import Iterable, Optional

import jax
import jax.numpy as jnp

from retro_jax.config import ATTENTION_IMPLS, RetroConfig
from retro_jax.core import accelerators

# What `resolve` returns: the implementations a layer runs.
RESOLVED = ("reference", "xla", "cudnn")
# cuDNN flash attention takes head widths that are multiples of 8 up to 128
# on every GPU it supports (256 from Hopper on; jax/_src/cudnn/
# fused_attention_stablehlo.py, check_is_flash_attention).
CUDNN_MAX_HEAD_DIM = 128


def on_nvidia_gpu() -> bool:
  """Whether JAX's default backend is an NVIDIA (CUDA) GPU; False where no
  backend could start."""
  try:
    return accelerators.is_nvidia_gpu()
  except RuntimeError:
    return False


def cudnn_takes_head_dim(head_dim: int) -> bool:
  return head_dim % 8 == 0 and head_dim <= CUDNN_MAX_HEAD_DIM


def resolve(impl: str, compute_dtype: str, head_dims: Iterable[int]) -> str:
  """The implementation ("reference" | "xla" | "cudnn") that `impl` (a
  `RetroConfig.attention` value) stands for, given the compute dtype name
  and the head widths of every attention layer."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention implementation {impl!r} is not one of "
                     f"{ATTENTION_IMPLS}")
  if impl != "auto":
    return impl
  if (compute_dtype == "bfloat16"
      and all(cudnn_takes_head_dim(int(k)) for k in head_dims)
      and on_nvidia_gpu()):
    return "cudnn"
  return "reference"


def resolve_config(cfg: RetroConfig) -> str:
  """`resolve` of a network's config: one choice for all its layers. cuDNN
  also needs even query and key lengths when a mask is trained through
  (check_is_flash_attention), so "auto" keeps an odd chunk or neighbour
  length on the reference path."""
  impl = resolve(cfg.attention, cfg.compute_dtype,
                 (cfg.head_dim, cfg.enc_head_dim))
  if (cfg.attention == "auto" and impl == "cudnn"
      and (cfg.chunk_size % 2 or cfg.neighbour_len % 2)):
    return "reference"
  return impl


def attend(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str,
           causal: bool = False,
           key_valid: Optional[jax.Array] = None) -> jax.Array:
  """Softmax attention through `jax.nn.dot_product_attention`, token-major.

  Semantics of attention.attend: logits and softmax in float32 (the xla
  implementation promotes the logits, cuDNN accumulates in float32), and a
  query with no valid key outputs exactly 0.

  Args:
    q: [..., T, H, K] queries, already scaled by 1/sqrt(K) (scale=1 here, so
      the products equal the reference path's).
    k, v: [..., S, H, K] keys and values, the same leading dims as q.
    implementation: "xla" or "cudnn".
    causal: query t attends to keys 0..t (T == S).
    key_valid: optional bool [..., S] (broadcastable): keys that exist.
  Returns:
    [..., T, H, K] in q's dtype.
  """
  if implementation not in ("xla", "cudnn"):
    raise ValueError(f"fused attention: implementation {implementation!r} "
                     f"is not xla or cudnn")
  lead, (t, h, kd), s = q.shape[:-3], q.shape[-3:], k.shape[-3]
  # Leading dims into the batch: reshapes, free for contiguous arrays.
  q = q.reshape(-1, t, h, kd)  # [B, T, H, K]
  k = k.reshape(-1, s, h, kd)  # [B, S, H, K]
  v = v.reshape(-1, s, h, kd)  # [B, S, H, K]
  mask = any_valid = None
  if key_valid is not None:
    valid = jnp.broadcast_to(key_valid, lead + (s,)).reshape(-1, s)  # [B, S]
    mask = valid[:, None, None, :]  # [B, 1, 1, S]
    if implementation == "cudnn":
      # cuDNN turns the mask into a bias whose last two dims must be (T, S)
      # exactly (check_layout in jax 0.10.2): no broadcasting over T there.
      mask = jnp.broadcast_to(mask, (valid.shape[0], 1, t, s))  # [B,1,T,S]
    any_valid = jnp.any(valid, axis=-1)  # [B]
  out = jax.nn.dot_product_attention(
      q, k, v, mask=mask, scale=1.0, is_causal=causal,
      implementation=implementation)  # [B, T, H, K]
  if any_valid is not None:
    # A fully masked row is a uniform average of its values (finite: masked
    # logits are large and negative, not -inf); zero it as attend does.
    out = out * any_valid[:, None, None, None].astype(out.dtype)
  return out.reshape(*lead, t, h, kd)  # [..., T, H, K]
