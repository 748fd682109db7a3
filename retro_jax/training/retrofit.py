"""RETROfit (paper §4.2): a trained baseline's weights inside a RETRO model.

The baseline is the same `RetroConfig` with `cca_layers=()`. Every parameter
outside the CCA layers and the neighbour encoder is copied from it; the
retrieval parameters keep their fresh initialisation and are the only ones
trained (`train.split_params(..., "retrieval")`).

With `scan_layers`, runs of plain decoder layers are stacked into one
parameter with a leading layer dimension (`decoder/layers_AA_BB/...`), and a
baseline's runs differ from RETRO's (no CCA layers break them), so parameters
are matched per decoder layer: (layer index, module below the layer, name).
"""

from __future__ import annotations

import re
from typing import Dict, Tuple

import haiku as hk
import jax
import jax.numpy as jnp

from retro_jax.config import RetroConfig
from retro_jax.training.step import is_retrieval_module

# Model fields a baseline may differ in (no parameter depends on them).
FREE_FIELDS = ("cca_layers", "scan_layers", "remat", "compute_dtype",
               "attention_block", "enc_cross_attention_layers",
               "zero_init_cca", "attention")

_SINGLE = re.compile(r"^decoder/layer_(\d+)(/.*|)$")
_STACKED = re.compile(r"^decoder/layers_(\d+)_(\d+)(/.*|)$")
Key = Tuple[object, str, str]


def check_baseline(baseline: RetroConfig, retro: RetroConfig) -> None:
  """Raises ValueError if the baseline cannot seed this RETRO model."""
  diffs = [f"{k}: baseline {v!r}, RETRO {getattr(retro, k)!r}"
           for k, v in baseline.to_dict().items()
           if k not in FREE_FIELDS and not k.startswith("enc_")
           and v != getattr(retro, k)]
  if diffs:
    raise ValueError("the baseline checkpoint's model differs from this "
                     "RETRO model outside the retrieval components: "
                     + "; ".join(diffs))


def per_layer(params: hk.Params) -> Dict[Key, jax.Array]:
  """Non-retrieval parameters keyed by (decoder layer or None, module path
  below it, name); stacked runs are sliced into their layers."""
  out = {}
  for module, name, value in hk.data_structures.traverse(params):
    if is_retrieval_module(module):
      continue
    single, stacked = _SINGLE.match(module), _STACKED.match(module)
    if single:
      out[(int(single.group(1)), single.group(2), name)] = value
    elif stacked:
      first, last = int(stacked.group(1)), int(stacked.group(2))
      for j in range(last - first + 1):
        out[(first + j, stacked.group(3), name)] = value[j]
    else:
      out[(None, module, name)] = value
  return out


def graft(params: hk.Params, baseline: hk.Params) -> hk.Params:
  """`params` with every non-retrieval parameter taken from `baseline`
  (jit-able: run it under `jax.jit(..., out_shardings=...)`)."""
  source = per_layer(baseline)
  used = set()

  def take(key, like):
    if key not in source:
      raise ValueError(f"baseline checkpoint has no parameter for {key} "
                       f"(layer, module, name)")
    value = source[key]
    if value.shape != like.shape:
      raise ValueError(f"baseline parameter {key} has shape {value.shape}, "
                       f"the RETRO model needs {like.shape}")
    used.add(key)
    return value.astype(like.dtype)

  out = {}
  for module, leaves in params.items():
    single, stacked = _SINGLE.match(module), _STACKED.match(module)
    new = {}
    for name, like in leaves.items():
      if is_retrieval_module(module):
        new[name] = like
      elif single:
        new[name] = take((int(single.group(1)), single.group(2), name), like)
      elif stacked:
        first, last = int(stacked.group(1)), int(stacked.group(2))
        new[name] = jnp.stack([
            take((first + j, stacked.group(3), name), like[j])
            for j in range(last - first + 1)])
      else:
        new[name] = take((None, module, name), like)
    out[module] = new
  unused = sorted(map(str, set(source) - used))
  if unused:
    raise ValueError(f"baseline parameters without a place in the RETRO "
                     f"model: {unused[:5]}{' ...' if len(unused) > 5 else ''}")
  return out
