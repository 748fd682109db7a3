"""Analytic FLOPs of a RETRO training step, for MFU.

Counts every matmul the model performs (2 FLOPs per multiply-add; training =
forward + backward = 3x forward), including the attention score and value
products as the implementation computes them: causal self-attention only over
the key blocks it does not skip (see `attention.causal_attend`), and
retrieval for the first L - 1 chunks only: the loss has no target at the last
position, the only one the last chunk's neighbours reach, so training never
encodes them (`Retro.apply(..., retrieve_for_last_position=False)`).
"""

from __future__ import annotations

from typing import Dict

from retro_jax.config import RetroConfig


def causal_score_pairs(t: int, block: int) -> int:
  """Query-key pairs computed by block-skipping causal attention."""
  if t % block or t <= block:
    return t * t
  nb = t // block
  return block * block * nb * (nb + 1) // 2


def train_flops(cfg: RetroConfig, batch: int, seq_len: int,
                retrieval: bool = True) -> Dict[str, float]:
  """Training FLOPs of one step, by component, and their `total`."""
  b, n, m = batch, seq_len, cfg.chunk_size
  l, k, r = n // m - 1, cfg.num_neighbours, cfg.neighbour_len  # Retrieving.
  d, hk_ = cfg.d_model, cfg.num_heads * cfg.head_dim
  e, ehk = cfg.enc_d_model, cfg.enc_num_heads * cfg.enc_head_dim
  dec_tok, enc_tok = b * n, b * l * k * r
  cca_tok = b * l * m              # Shifted positions that attend.
  n_cca = len(cfg.cca_layers) if retrieval else 0
  n_xenc = len(cfg.enc_cross_attention_layers)

  macs = {}
  macs["decoder_dense"] = cfg.num_layers * (4 * d * hk_ + 2 * d * cfg.d_ff) * dec_tok
  macs["decoder_self_attention"] = (
      cfg.num_layers * 2 * b * causal_score_pairs(n, cfg.attention_block) * hk_)
  macs["logits"] = d * cfg.vocab_size * dec_tok
  if n_cca:
    macs["cca_dense"] = n_cca * (2 * d * hk_ * cca_tok + 2 * e * hk_ * enc_tok)
    macs["cca_attention"] = n_cca * 2 * (b * l) * m * (k * r) * hk_
    enc = cfg.enc_num_layers * (4 * e * ehk + 2 * e * cfg.enc_d_ff) * enc_tok
    enc += n_xenc * (2 * e * ehk * enc_tok + 2 * d * ehk * cca_tok)
    if cfg.share_embeddings and e != d:
      enc += d * e * enc_tok
    macs["encoder_dense"] = enc
    macs["encoder_attention"] = (
        cfg.enc_num_layers * 2 * (b * l * k) * r * r * ehk
        + n_xenc * 2 * (b * l) * (k * r) * m * ehk)
  out = {name: 6.0 * v for name, v in macs.items()}
  out["total"] = sum(out.values())
  return out
