r"""Prints parameter counts of the paper presets beside the paper's Table 2.

  python scripts/count_params.py

Counts come from `jax.eval_shape` (nothing is allocated) and leave out the
token embeddings and the output matrix, as Table 2 does. The paper's models
use Transformer-XL relative position encodings, which carry one d x (heads x
head size) projection per attention layer that rotary embeddings do not have;
the `+rel` columns add exactly that term so the two counts can be compared.
"""

from absl import app

import retro_jax
from retro_jax.config import PAPER_TABLE2_M


def main(argv):
  del argv
  print("| preset | d_model | layers | heads x size | CCA layers | baseline "
        "(paper) | baseline (ours) | ours +rel | RETRO (paper) | RETRO (ours) "
        "| ours +rel |")
  print("|---" * 11 + "|")
  for name, (paper_base, paper_retro) in PAPER_TABLE2_M.items():
    cfg = retro_jax.RetroConfig.preset(name)
    base_cfg = cfg.replace(cca_layers=())
    retro = retro_jax.count_params(cfg, exclude_embeddings=True) / 1e6
    base = retro_jax.count_params(base_cfg, exclude_embeddings=True) / 1e6
    rel = cfg.d_model * cfg.num_heads * cfg.head_dim / 1e6   # One layer's.
    enc_rel = cfg.enc_num_layers * cfg.enc_d_model * (
        cfg.enc_num_heads * cfg.enc_head_dim) / 1e6
    base_rel = base + cfg.num_layers * rel
    retro_rel = retro + (cfg.num_layers + len(cfg.cca_layers)) * rel + enc_rel
    print(f"| {name} | {cfg.d_model} | {cfg.num_layers} | "
          f"{cfg.num_heads}x{cfg.head_dim} | {list(cfg.cca_layers)} | "
          f"{paper_base:,}M | {base:,.0f}M | {base_rel:,.0f}M | "
          f"{paper_retro:,}M | {retro:,.0f}M | {retro_rel:,.0f}M |")


if __name__ == "__main__":
  app.run(main)
