"""The decoder stack's wiring (retro_jax.model.stack): how layers group into
runs, and the parameter names every checkpoint holds."""

import json
import os

import haiku as hk
import jax
import pytest

from conftest import REPO_ROOT
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


# Names and shapes of every parameter, as the code before the role packages
# wrote them: checkpoints are stored under these, so a change here is a change
# of the checkpoint format.
_PARAMS = os.path.join(REPO_ROOT, "tests", "fixtures", "tiny_param_shapes.json")


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
  with open(_PARAMS, encoding="utf-8") as f:
    want = json.load(f)["params"]
  assert sorted(got) == sorted(want)
