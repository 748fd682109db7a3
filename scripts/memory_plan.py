r"""Prints memory per device for the paper's presets on TPU slices (no TPU
needed): parameters, optimizer state, gradients (exact, from the shardings)
and activations (estimate), so a slice can be picked before paying for it.

  python scripts/memory_plan.py --slices=v4-32,v5e-256 \
      [--config=configs/retro.py] [--sizes=172m,425m,1.5b,7.5b] \
      [--mesh=data=1,fsdp=-1,model=1] [--batch_size=256] [--seq_len=2048]

Model settings (bf16 compute, remat) and the default mesh and batch come
from the config file for each size (configs/retro.py:<size>).
"""

from absl import flags

from retro_jax.config import RetroConfig
from retro_jax.core import cli
from retro_jax.training import memory_plan
from retro_jax.training import run_config

_CONFIG = flags.DEFINE_string("config", "configs/retro.py", "Config file "
                              "with get_config(size).")
_SIZES = flags.DEFINE_list("sizes", ["172m", "425m", "1.5b", "7.5b"],
                           "Sizes to plan.")
_SLICES = flags.DEFINE_list("slices", ["v4-32", "v5e-256"], "TPU slices.")
_MESH = flags.DEFINE_string("mesh", "", "Mesh, e.g. data=2,fsdp=-1,model=1; "
                            "empty = the config's.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Global batch; 0 = config's.")
_SEQ = flags.DEFINE_integer("seq_len", 0, "Sequence length; 0 = config's.")
_ACCUM = flags.DEFINE_integer("accum_steps", 0, "Micro-batches; 0 = config's.")


def parse_mesh(text):
  axes = {}
  for part in filter(None, text.split(",")):
    name, _, value = part.partition("=")
    try:
      axes[name.strip()] = int(value)
    except ValueError:
      raise ValueError(f"--mesh={text}: {part!r} is not axis=size, e.g. "
                       "data=2,fsdp=-1,model=1") from None
  return axes


def main(argv):
  del argv
  rows = []
  for size in _SIZES.value:
    config = run_config.load_config_file(_CONFIG.value, size)
    cfg = RetroConfig.from_dict(config.model)
    mesh = parse_mesh(_MESH.value) if _MESH.value else dict(config.mesh)
    for name in _SLICES.value:
      row = memory_plan.plan(
          cfg, name, mesh, _BATCH.value or config.train.batch_size,
          _SEQ.value or config.train.seq_len,
          _ACCUM.value or config.train.accum_steps)
      rows.append({"preset": f"{size} ({cfg.compute_dtype}, "
                             f"remat={cfg.remat})", **row})
  print(memory_plan.format_table(rows))


if __name__ == "__main__":
  cli.run(main)  # A bad --mesh, --config or slice: one line, status 1.
