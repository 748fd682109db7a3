"""The decoder stack's wiring (retro_jax.model.stack): how layers group into
runs, and the parameter names every checkpoint holds."""

import haiku as hk
import jax
import pytest

from retro_jax.config import RetroConfig
from retro_jax.model import stack
from retro_jax.model.network import Retro


@pytest.mark.parametrize("overrides, runs", [
    (dict(), [(0, 1, False), (1, 1, True), (2, 1, False), (3, 1, True)]),
    (dict(num_layers=6, cca_layers=(3, 6), scan_layers=True),
     [(0, 2, False), (2, 1, True), (3, 2, False), (5, 1, True)]),
    (dict(num_layers=3, cca_layers=(1,), scan_layers=True),
     [(0, 1, True), (1, 2, False)]),
    (dict(num_layers=3, cca_layers=(), scan_layers=False),
     [(0, 1, False), (1, 1, False), (2, 1, False)]),
])
def test_decoder_runs_group_plain_layers_between_cca_layers(overrides, runs):
  assert stack.decoder_runs(RetroConfig.preset("tiny", **overrides)) == runs


# Names and shapes of every parameter: checkpoints are stored under these, so
# a change here is a change of the checkpoint format.
_PARAMS = """
  decoder/layer_00/attn_norm/scale (64,)
  decoder/layer_00/mlp/w_in (64, 256)
  decoder/layer_00/mlp/w_out (256, 64)
  decoder/layer_00/mlp_norm/scale (64,)
  decoder/layer_00/self_attention/w_o (4, 16, 64)
  decoder/layer_00/self_attention/w_qkv (64, 3, 4, 16)
  decoder/layer_01/attn_norm/scale (64,)
  decoder/layer_01/cca/w_kv (32, 2, 4, 16)
  decoder/layer_01/cca/w_o (4, 16, 64)
  decoder/layer_01/cca/w_q (64, 4, 16)
  decoder/layer_01/cca_norm/scale (64,)
  decoder/layer_01/encoder/final_norm/scale (32,)
  decoder/layer_01/encoder/layer_00/attn_norm/scale (32,)
  decoder/layer_01/encoder/layer_00/context_norm/scale (64,)
  decoder/layer_01/encoder/layer_00/cross_attention/w_kv (64, 2, 4, 16)
  decoder/layer_01/encoder/layer_00/cross_attention/w_o (4, 16, 32)
  decoder/layer_01/encoder/layer_00/cross_attention/w_q (32, 4, 16)
  decoder/layer_01/encoder/layer_00/cross_norm/scale (32,)
  decoder/layer_01/encoder/layer_00/mlp/w_in (32, 256)
  decoder/layer_01/encoder/layer_00/mlp/w_out (256, 32)
  decoder/layer_01/encoder/layer_00/mlp_norm/scale (32,)
  decoder/layer_01/encoder/layer_00/self_attention/w_o (4, 16, 32)
  decoder/layer_01/encoder/layer_00/self_attention/w_qkv (32, 3, 4, 16)
  decoder/layer_01/encoder/layer_01/attn_norm/scale (32,)
  decoder/layer_01/encoder/layer_01/mlp/w_in (32, 256)
  decoder/layer_01/encoder/layer_01/mlp/w_out (256, 32)
  decoder/layer_01/encoder/layer_01/mlp_norm/scale (32,)
  decoder/layer_01/encoder/layer_01/self_attention/w_o (4, 16, 32)
  decoder/layer_01/encoder/layer_01/self_attention/w_qkv (32, 3, 4, 16)
  decoder/layer_01/mlp/w_in (64, 256)
  decoder/layer_01/mlp/w_out (256, 64)
  decoder/layer_01/mlp_norm/scale (64,)
  decoder/layer_01/self_attention/w_o (4, 16, 64)
  decoder/layer_01/self_attention/w_qkv (64, 3, 4, 16)
  decoder/layer_04/attn_norm/scale (64,)
  decoder/layer_04/cca/w_kv (32, 2, 4, 16)
  decoder/layer_04/cca/w_o (4, 16, 64)
  decoder/layer_04/cca/w_q (64, 4, 16)
  decoder/layer_04/cca_norm/scale (64,)
  decoder/layer_04/mlp/w_in (64, 256)
  decoder/layer_04/mlp/w_out (256, 64)
  decoder/layer_04/mlp_norm/scale (64,)
  decoder/layer_04/self_attention/w_o (4, 16, 64)
  decoder/layer_04/self_attention/w_qkv (64, 3, 4, 16)
  decoder/layers_02_03/attn_norm/scale (2, 64)
  decoder/layers_02_03/mlp/w_in (2, 64, 256)
  decoder/layers_02_03/mlp/w_out (2, 256, 64)
  decoder/layers_02_03/mlp_norm/scale (2, 64)
  decoder/layers_02_03/self_attention/w_o (2, 4, 16, 64)
  decoder/layers_02_03/self_attention/w_qkv (2, 64, 3, 4, 16)
  embed/embeddings (512, 64)
  enc_embed_proj/w (64, 32)
  final_norm/scale (64,)
  output/w (64, 512)
"""


def test_parameter_names_are_those_of_checkpoints():
  # A single plain layer, a scanned run, two CCA layers (the first holds the
  # encoder), an encoder narrower than the decoder, an untied output.
  cfg = RetroConfig.preset("tiny", num_layers=5, cca_layers=(2, 5),
                           scan_layers=True, enc_d_model=32)
  model = Retro(cfg)
  params = jax.eval_shape(model.init, jax.random.key(0),
                          *model.dummy_inputs())
  got = [f"{module}/{name} {tuple(leaf.shape)}"
         for module, name, leaf in hk.data_structures.traverse(params)]
  want = [line.strip() for line in _PARAMS.strip().splitlines()]
  assert sorted(got) == sorted(want)
