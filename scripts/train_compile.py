r"""Compiles the train step for a TPU slice on this host, no TPU needed, and
prints XLA's memory per chip and FLOPs beside memory_plan's estimate and
the analytic count.

  python scripts/train_compile.py --config=configs/retro.py:172m \
      --topology=v5e-256 --config.mesh.data=16 --config.mesh.fsdp=16
  python scripts/train_compile.py --config=configs/retro.py:7.5b \
      --topology=v4-32 --config.train.accum_steps=8 [--json=out.json]

--topology is a slice (v4-32, v5e-256, v5p-128, v6e-64) or a chip grid
(v4:2x2x4, v5e:16x16). The step is the one scripts/train.py runs (config's
model, optimizer, mesh, batch, accumulation, trainable); it needs libtpu
(`pip install .[tpu]`, installed by scripts/setup_env.sh on Linux x86-64).
See retro_jax/training/aot.py.
"""

import json

from absl import flags
from ml_collections import config_flags

from retro_jax.core import cli

_CONFIG = config_flags.DEFINE_config_file("config", "configs/retro.py:172m",
                                          "Run config file.")
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice or chip grid, "
                                "e.g. v4-32, v5e-256, v5e:16x16.")
_JSON = flags.DEFINE_string("json", "", "Also write the figures here.")
flags.mark_flag_as_required("topology")


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {argv[1:]}", status=2)
  from retro_jax.training import aot  # pylint: disable=g-import-not-at-top
  aot.prepare_host()
  result = aot.compile_train_step(_CONFIG.value, _TOPOLOGY.value)
  print(aot.format_result(result), flush=True)
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  # libtpu compiles for the TPU here: jax must keep its TPU plugin.
  cli.run(main, cpu_without_accelerator=False)  # Bad input: one line, status 1.
