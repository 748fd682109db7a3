"""Model hyperparameters of RETRO and the paper's size presets.

`RetroConfig` is the typed, frozen description of one network. Experiment
configs (`configs/*.py`, ml_collections) hold a `model` ConfigDict whose fields
are exactly these; `RetroConfig.from_dict` turns it into this class and names
any field it does not know.

Layer numbers in `cca_layers` and `encoder_cross_attention_layers` count from
1, as the paper does ("CCA in layers 6, 9, 12").
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Tuple

DTYPES = ("float32", "bfloat16")
# RetroConfig.attention: which attention kernels the whole-sequence forward
# uses (model/fused_attention.py resolves "auto").
ATTENTION_IMPLS = ("auto", "reference", "xla", "cudnn")

# Token ids every part of retro_jax agrees on (T5 / seqio convention): the
# SentencePiece vocabularies are trained with them, the DB pads chunks with
# PAD_ID, the model masks neighbour tokens equal to PAD_ID, and the loss
# ignores it. BOS_ID = -1: no beginning-of-sequence piece.
PAD_ID, EOS_ID, UNK_ID, BOS_ID = 0, 1, 2, -1
# m, tokens per retrieval chunk: the paper's, the DB's on-disk chunk width and
# RetroConfig.chunk_size's default.
CHUNK_SIZE = 64


def paper_cca_layers(num_layers: int) -> Tuple[int, ...]:
  """CCA layers of the paper's Table 10: from layer 6 (12-layer models) or
  layer 9 (deeper ones), every third layer up to the last."""
  first = 6 if num_layers <= 12 else 9
  return tuple(range(first, num_layers + 1, 3))


@dataclasses.dataclass(frozen=True)
class RetroConfig:
  """Hyperparameters of one RETRO network (decoder + neighbour encoder)."""

  vocab_size: int = 128_000          # SentencePiece vocabulary (paper: 128k).
  d_model: int = 896                 # Decoder width.
  num_layers: int = 12               # Decoder layers.
  num_heads: int = 16                # Decoder attention heads.
  head_dim: int = 64                 # Width of one head.
  d_ff: int = 3584                   # Decoder feed-forward width (4 * d_model).
  cca_layers: Tuple[int, ...] = (6, 9, 12)  # 1-indexed decoder layers with CCA.
  chunk_size: int = CHUNK_SIZE       # m: tokens per retrieval chunk.
  num_neighbours: int = 2            # k: neighbours per chunk.
  neighbour_len: int = 128           # r: neighbour chunk + its continuation.
  enc_d_model: int = 896             # Neighbour encoder width.
  enc_num_layers: int = 2            # Neighbour encoder layers.
  enc_num_heads: int = 14            # Encoder heads (14 x 64 = 896).
  enc_head_dim: int = 64             # Encoder head width.
  enc_d_ff: int = 3584               # Encoder feed-forward width.
  # 1-indexed encoder layers that cross-attend to the decoder activations of
  # their chunk; the paper conditions the first layer only.
  enc_cross_attention_layers: Tuple[int, ...] = (1,)
  share_embeddings: bool = True      # Encoder reuses the decoder's embedding.
  tie_output: bool = False           # Logits use the transposed embedding.
  # CCA output projections start at zero, so at initialisation RETRO computes
  # exactly its no-retrieval baseline and the residual stream carries no
  # neighbour noise until CCA has learnt something (cf. Flamingo's zero gates).
  zero_init_cca: bool = False
  # CCA queries and keys add learned per-head vectors before RoPE: the
  # position terms of the paper's relative attention in CCA (content x
  # position, position only; cross_attention.ChunkedCrossAttention).
  cca_qk_bias: bool = False
  # CCA's value and output projections start as identities and an untied
  # output as the embedding's transpose: an attended neighbour token raises
  # its own logit from the first step, so attention learns where to read at
  # once instead of after a long plateau (docs/results.md §2).
  cca_copy_init: bool = False
  # Neighbours shifted onto their query chunk where their tokens match it
  # best, and dropped below this many matching tokens
  # (model/neighbour_alignment.py). 0 = the paper's layout, as retrieved.
  neighbour_alignment: int = 0
  rope_base: float = 10_000.0        # Rotary embedding base frequency.
  norm_eps: float = 1e-6             # RMSNorm epsilon.
  compute_dtype: str = "float32"     # Activations/matmuls: float32 | bfloat16;
                                     # parameters always stay float32.
  remat: str = "none"                # none | full | dots: hk.remat per layer.
  scan_layers: bool = False          # Scan runs of plain (non-CCA) decoder
                                     # layers: faster compiles of deep models.
  attention_block: int = 128         # Query block of causal self-attention;
                                     # fully masked key blocks are skipped.
  attention: str = "auto"            # auto|reference|xla|cudnn kernels.

  def __post_init__(self):
    self.validate()

  # -- validation -----------------------------------------------------------
  def validate(self) -> None:
    """Raises ValueError naming the first inconsistent field."""
    def need(cond, field, msg):
      if not cond:
        raise ValueError(f"RetroConfig.{field}: {msg} "
                         f"(got {getattr(self, field)!r})")

    for f in ("vocab_size", "d_model", "num_layers", "num_heads", "head_dim",
              "d_ff", "chunk_size", "num_neighbours", "neighbour_len",
              "enc_d_model", "enc_num_layers", "enc_num_heads",
              "enc_head_dim", "enc_d_ff", "attention_block"):
      need(isinstance(getattr(self, f), int) and getattr(self, f) > 0, f,
           "must be a positive integer")
    need(all(1 <= l <= self.num_layers for l in self.cca_layers), "cca_layers",
         f"layers are 1-indexed and must lie in [1, {self.num_layers}]")
    need(len(set(self.cca_layers)) == len(self.cca_layers), "cca_layers",
         "must not repeat a layer")
    need(all(1 <= l <= self.enc_num_layers
             for l in self.enc_cross_attention_layers),
         "enc_cross_attention_layers",
         f"layers are 1-indexed and must lie in [1, {self.enc_num_layers}]")
    need(isinstance(self.neighbour_alignment, int)
         and 0 <= self.neighbour_alignment <= self.chunk_size,
         "neighbour_alignment", f"an integer in [0, {self.chunk_size}]")
    need(self.compute_dtype in DTYPES, "compute_dtype", f"one of {DTYPES}")
    need(self.remat in ("none", "full", "dots"), "remat",
         "one of none, full, dots")
    need(self.attention in ATTENTION_IMPLS, "attention",
         f"one of {', '.join(ATTENTION_IMPLS)}")
    # cuDNN's flash attention takes fp16/bf16 operands only.
    need(self.attention != "cudnn" or self.compute_dtype == "bfloat16",
         "attention", "cudnn needs compute_dtype='bfloat16'")
    need(self.head_dim % 2 == 0, "head_dim", "rotary needs an even head_dim")
    need(self.enc_head_dim % 2 == 0, "enc_head_dim",
         "rotary needs an even head_dim")

  # -- construction ---------------------------------------------------------
  @classmethod
  def preset(cls, name: str, **overrides: Any) -> "RetroConfig":
    """A named preset (see `PRESETS`), with optional field overrides."""
    key = str(name).lower()
    if key not in PRESETS:
      raise ValueError(f"unknown RETRO preset {name!r}; known presets: "
                       f"{', '.join(PRESETS)}")
    return cls.from_dict({**PRESETS[key], **overrides})

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "RetroConfig":
    """Builds a config from a mapping (e.g. an ml_collections ConfigDict)."""
    values = dict(values)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"unknown RetroConfig field(s) {unknown}; known fields: "
                       f"{sorted(known)}")
    for f in ("cca_layers", "enc_cross_attention_layers"):
      if f in values:
        values[f] = tuple(int(v) for v in values[f])
    return cls(**values)

  def replace(self, **changes: Any) -> "RetroConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  # -- derived --------------------------------------------------------------
  @property
  def cca_layer_indices(self) -> Tuple[int, ...]:
    """0-indexed decoder layers that hold chunked cross-attention."""
    return tuple(sorted(l - 1 for l in self.cca_layers))

  @property
  def has_retrieval(self) -> bool:
    return bool(self.cca_layers)


def _paper(d_model: int, num_layers: int, num_heads: int,
           head_dim: int) -> dict:
  return dict(d_model=d_model, num_layers=num_layers, num_heads=num_heads,
              head_dim=head_dim, d_ff=4 * d_model,
              cca_layers=paper_cca_layers(num_layers))


# The paper's Table 2 sizes plus two small ones. Encoder: 2 layers of width
# 896 for every paper size (App. B), vocabulary 128k SentencePiece.
PRESETS: dict = {
    # Small enough for fast CPU tests, with the paper's m=64, k=2, r=128.
    "tiny": dict(vocab_size=512, d_model=64, num_layers=4, num_heads=4,
                 head_dim=16, d_ff=256, cca_layers=(2, 4), enc_d_model=64,
                 enc_num_layers=2, enc_num_heads=4, enc_head_dim=16,
                 enc_d_ff=256, attention_block=64),
    # The benchmark configuration, shared with the retro-pytorch peer
    # (benchmarks/peer/bench_retro_pytorch.py builds the same network).
    "bench": dict(vocab_size=8192, d_model=512, num_layers=6, num_heads=8,
                  head_dim=64, d_ff=2048, cca_layers=(3, 6), enc_d_model=512,
                  enc_num_layers=2, enc_num_heads=8, enc_head_dim=64,
                  enc_d_ff=2048),
    "172m": _paper(896, 12, 16, 64),
    "425m": _paper(1536, 12, 12, 128),
    "1.5b": _paper(2048, 24, 16, 128),
    "7.5b": _paper(4096, 32, 32, 128),
}

# Table 2 of the paper, millions of parameters without embeddings:
# (baseline, RETRO).
PAPER_TABLE2_M = {
    "172m": (132, 172),
    "425m": (368, 425),
    "1.5b": (1309, 1451),
    "7.5b": (6982, 7532),
}


def dtype_of(name: Optional[str]):
  import jax.numpy as jnp  # Local: keep this module importable without jax.
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]
