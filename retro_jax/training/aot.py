"""Ahead-of-time compilation of the real train step for a TPU topology, on a
host without TPUs (MaxText's train_compile.py idea).

libtpu (`pip install .[tpu]`) describes any slice's chips without owning
one: `jax.experimental.topologies` gives compile-only devices, the run
config's mesh is laid over them, and the same jitted, sharded, donating step
`training/loop.py` runs is lowered with abstract inputs (ShapeDtypeStructs
carrying their shardings; nothing is allocated) and compiled by XLA's TPU
compiler. What comes back is XLA's own per-chip account: argument, output,
temporary and code bytes, and FLOPs, set beside `memory_plan`'s estimate and
`model/flops.py`'s count, so a slice, mesh and batch can be checked before
one is rented.

`prepare_host()` must run before JAX starts a backend (see there).
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import time
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import ml_collections

from retro_jax.config import RetroConfig
from retro_jax.core import sharding
from retro_jax.model import flops
from retro_jax.model import stack
from retro_jax.model.network import Retro
from retro_jax.training import loop
from retro_jax.training import memory_plan
from retro_jax.training import step as step_lib

# Set before the TPU plugin loads. JAX_PLATFORMS=cpu: the host's own arrays
# (eval_shape, tracing) stay on CPU and no TPU client is made.
# ALLOW_MULTIPLE_LIBTPU_LOAD: libtpu otherwise takes /tmp/libtpu_lockfile,
# and a second process (a test's subprocess, a job on a TPU VM) gets no
# topology. TPU_HOST_BOUNDS / TPU_WORKER_HOSTNAMES: without them libtpu asks
# the GCE metadata server for this host's slice and prints five lines of
# warnings when there is none; compile-only topologies do not use them.
HOST_ENV = {"JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
            "TPU_HOST_BOUNDS": "1,1,1", "TPU_WORKER_HOSTNAMES": "localhost"}

# Generation -> (dimensions of its chip grid, chip config, the slice name's
# unit: TensorCores per chip). v4 and v5p count cores in slice names and
# run one JAX device per chip ("megacore"); v2 and v3 run one device per core.
GENERATIONS = {
    "v2": (2, "default", 2), "v3": (2, "default", 2),
    "v4": (3, "megacore", 2), "v5p": (3, "megacore", 2),
    "v5e": (2, "default", 1), "v6e": (2, "default", 1),
}
_ALIASES = {"v5litepod": "v5e", "v6": "v6e"}
GIB = memory_plan.GIB


def prepare_host() -> None:
  """Sets HOST_ENV's variables where unset; call before JAX's first
  backend use. JAX read JAX_PLATFORMS when it was imported, so its setting
  is passed on as `jax_platforms` too."""
  for key, value in HOST_ENV.items():
    os.environ.setdefault(key, value)
  if jax.config.jax_platforms is None:
    jax.config.update("jax_platforms", os.environ["JAX_PLATFORMS"])


def slice_shape(generation: str, chips: int) -> Tuple[int, ...]:
  """The chip grid Cloud TPU gives a slice of `chips` chips: start from
  one chip (2x2x1 in 3D) and double the smallest dimension, the last one
  on ties (v4-32 -> 2x2x4, v5e-256 -> 16x16)."""
  dims, _, _ = GENERATIONS[generation]
  shape = [1] * dims if dims == 2 else [2, 2, 1]
  while math.prod(shape) < chips:
    small = min(shape)
    shape[max(i for i, s in enumerate(shape) if s == small)] *= 2
  if math.prod(shape) != chips:
    raise ValueError(f"{chips} chips is not a {generation} slice size "
                     f"(a power of two, from {4 if dims == 3 else 1})")
  return tuple(shape)


def parse_topology(name: str) -> Tuple[str, str, Dict[str, Any]]:
  """A slice ('v4-32', 'v5e-256', 'v5litepod-16') or a chip grid
  ('v4:2x2x4', 'v5e:16x16') -> (generation, topology name, keyword
  arguments of `get_topology_desc`)."""
  text = name.strip().lower()
  match = re.fullmatch(r"([a-z0-9]+)([-:])([0-9x]+)", text)
  gen = _ALIASES.get(match.group(1), match.group(1)) if match else None
  if gen not in GENERATIONS or (match.group(2) == "-" and "x" in
                                match.group(3)):
    raise ValueError(f"--topology={name}: expected a slice like v4-32 or "
                     f"v5e-256, or a chip grid like v4:2x2x4 or v5e:16x16, "
                     f"of generation {', '.join(sorted(GENERATIONS))}")
  dims, chip_config, cores_per_chip = GENERATIONS[gen]
  if match.group(2) == "-":
    cores = int(match.group(3))
    if cores % cores_per_chip:
      raise ValueError(f"--topology={name}: {gen} slice sizes count "
                       f"TensorCores, {cores_per_chip} per chip")
    try:
      shape = slice_shape(gen, cores // cores_per_chip)
    except ValueError as e:
      raise ValueError(f"--topology={name}: {e}") from None
  else:
    shape = tuple(int(s) for s in match.group(3).split("x") if s)
  # libtpu's default host is 2x2x1 chips; a smaller grid is one host.
  host = tuple(min(s, 2) for s in shape[:2]) + (1,)
  kwargs = {"chip_config_name": chip_config, "chips_per_host_bounds": host}
  return gen, f"{gen}:{'x'.join(map(str, shape))}", kwargs


def topology_devices(name: str):
  """(generation, topology name, compile-only devices) of `name`."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  gen, topo, kwargs = parse_topology(name)
  if importlib.util.find_spec("libtpu") is None:
    raise ValueError(f"--topology={name}: libtpu is not installed (pip "
                     f"install .[tpu]; Linux x86-64 only)")
  try:
    devices = topologies.get_topology_desc(topology_name=topo,
                                           platform="tpu", **kwargs).devices
  except RuntimeError as e:   # JaxRuntimeError: libtpu's INVALID_ARGUMENT.
    first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
    raise ValueError(f"--topology={name}: libtpu has no {topo}: {first}"
                     ) from None
  return gen, topo, list(devices)


def padded_bytes(shape, dtype, layout) -> int:
  """Bytes of an array in a TPU layout: dimensions in major-to-minor order,
  the minor ones padded up to the first tile (e.g. (8, 128) for float32
  matrices), as XLA counts argument and output sizes."""
  dims = [shape[i] for i in layout.major_to_minor]
  tile = layout.tiling[0] if layout.tiling else ()
  dims = [1] * max(len(tile) - len(dims), 0) + dims
  for i, t in enumerate(tile):
    j = len(dims) - len(tile) + i
    dims[j] = -(-dims[j] // t) * t
  return math.prod(dims) * jnp.dtype(dtype).itemsize


def flops_as_xla_counts(cfg: RetroConfig, batch_size: int, seq_len: int,
                       accum_steps: int = 1) -> float:
  """`flops.train_flops` as XLA's cost analysis counts it: a while loop's
  body once, not once per iteration (a scanned run of decoder layers counts
  as one layer; accumulation's micro-batch loop as one micro-batch), and
  the forward pass again where remat recomputes it (`full`: every layer,
  with CCA and the encoder inside; `dots`: the attention products, whose
  batched dots are not saved)."""
  counted_layers = len(stack.decoder_runs(cfg))  # A scanned run is one.
  total = 0.0
  for name, value in flops.train_flops(cfg, batch_size, seq_len).items():
    if name == "total":
      continue
    if name.startswith("decoder_"):
      value *= counted_layers / cfg.num_layers
    if ((cfg.remat == "full" and name != "logits")
        or (cfg.remat == "dots" and name.endswith("attention"))):
      value *= 4 / 3       # Forward (1) + recomputed (1) + backward (2).
    total += value
  return total / accum_steps


def _with_shardings(tree, shardings):
  return jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      tree, shardings)


def compile_train_step(config: ml_collections.ConfigDict,
                       topology: str) -> Dict[str, Any]:
  """Lowers and compiles the run's train step for `topology`'s chips.

  Returns per-chip figures: XLA's memory (`xla_*` bytes), the argument
  bytes expected from the shardings and the compiled layouts
  (`expected_argument_bytes`), memory_plan's estimate (`plan_*` bytes),
  compiled and analytic FLOPs of one step, and the times taken.
  """
  gen, topo, devices = topology_devices(topology)
  cfg = RetroConfig.from_dict(config.model)
  tc = config.train
  try:
    mesh = sharding.make_mesh(dict(config.mesh), devices)
  except ValueError as e:
    raise ValueError(f"config.mesh on {topo} ({len(devices)} devices): {e}"
                     ) from None
  data = mesh.shape["data"] * mesh.shape["fsdp"]
  if tc.accum_steps < 1 or tc.batch_size % (tc.accum_steps * data):
    raise ValueError(
        f"config.train.batch_size={tc.batch_size} with config.train."
        f"accum_steps={tc.accum_steps} does not split over the mesh's "
        f"data x fsdp = {data} devices of {topo}")

  model = Retro(cfg)
  optimizer = step_lib.optimizer_from_config(tc)
  batch = loop.abstract_batch(cfg, tc.batch_size, tc.seq_len)
  abstract, state_sh, _ = step_lib.state_shardings(
      model, optimizer, mesh, batch, trainable=tc.trainable)
  step_fn = step_lib.jit_train_step(model, optimizer, mesh, state_sh, batch,
                                    tc.trainable, tc.accum_steps)
  batch_in = jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(
          a.shape, a.dtype, sharding=sharding.batch_sharding(mesh, a.ndim)),
      batch)
  state_in = _with_shardings(abstract, state_sh)
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    lowered = step_fn.lower(state_in, batch_in)
    lowered_at, cpu_at = time.perf_counter(), time.process_time()
    compiled = lowered.compile()
  # CPU seconds too: on a shared host the wall time says more about the
  # neighbours than about the compiler.
  done, cpu_done = time.perf_counter(), time.process_time()

  mem = compiled.memory_analysis()
  # Under FSDP, XLA's SPMD partitioner turns weight matmuls into loops over
  # the shards ("windowed einsums"); its cost analysis counts one iteration
  # of every loop, so these make its FLOPs low.
  windowed = len(re.findall(r" while\(.*condition=%?[\w.]*windowed_dot_general",
                            compiled.as_text()))
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  # Each input's shard in the layout XLA chose for it: [state..., batch...].
  padded = [padded_bytes(x.sharding.shard_shape(x.shape), x.dtype, f.layout)
            for x, f in zip(jax.tree_util.tree_leaves((state_in, batch_in)),
                            jax.tree_util.tree_leaves(
                                compiled.input_formats[0]))]
  n_state = len(jax.tree_util.tree_leaves(state_in))
  plan = memory_plan.estimate(cfg, mesh, tc.batch_size, tc.seq_len,
                              tc.accum_steps, tc.trainable)
  batch_bytes = sum(math.prod(x.sharding.shard_shape(x.shape))
                    * x.dtype.itemsize for x in jax.tree_util.tree_leaves(
                        batch_in))
  xla_total = (mem.argument_size_in_bytes + mem.output_size_in_bytes
               - mem.alias_size_in_bytes + mem.temp_size_in_bytes
               + mem.generated_code_size_in_bytes)
  return {
      "topology": topo, "devices": len(devices),
      "device_kind": devices[0].device_kind,
      "hbm_bytes": memory_plan.TPU_GENERATIONS[gen][1],
      "mesh": dict(mesh.shape), "num_params": plan["num_params"],
      "lower_s": lowered_at - start, "compile_s": done - lowered_at,
      "compile_cpu_s": cpu_done - cpu_at,
      "xla_argument_bytes": mem.argument_size_in_bytes,
      "xla_output_bytes": mem.output_size_in_bytes,
      "xla_alias_bytes": mem.alias_size_in_bytes,
      "xla_temp_bytes": mem.temp_size_in_bytes,
      "xla_code_bytes": mem.generated_code_size_in_bytes,
      "xla_total_bytes": xla_total,
      "expected_argument_bytes": sum(padded),
      "expected_state_bytes": sum(padded[:n_state]),
      "plan_argument_bytes": plan["params"] + plan["opt_state"] + batch_bytes,
      "plan_temp_bytes": plan["grads"] + plan["acts"] + plan["gathered"],
      "plan_total_bytes": plan["total"] + batch_bytes,
      "xla_flops": float(cost.get("flops", 0.0)) * len(devices),
      "xla_windowed_loops": windowed,
      "analytic_flops": flops.train_flops(cfg, tc.batch_size,
                                          tc.seq_len)["total"],
      "analytic_flops_as_xla_counts": flops_as_xla_counts(
          cfg, tc.batch_size, tc.seq_len, tc.accum_steps),
  }


def _ratio(a: float, b: float) -> str:
  return f"{a / b:.2f}" if b else "-"


def format_result(r: Dict[str, Any]) -> str:
  """The figures of `compile_train_step` as an aligned text table."""
  mesh = "x".join(str(r["mesh"][a]) for a in sharding.MESH_AXES)
  lines = [
      f"{r['topology']}: {r['devices']} x {r['device_kind']} "
      f"({r['hbm_bytes'] / GIB:.0f} GiB HBM each), mesh data x fsdp x "
      f"model = {mesh}, {r['num_params']:,} parameters",
      f"lower {r['lower_s']:.1f} s, compile {r['compile_s']:.1f} s "
      f"({r['compile_cpu_s']:.1f} s of CPU)",
      f"{'GiB per chip':<40}{'XLA':>9}{'plan':>9}{'ratio':>7}"]
  rows = (("arguments (params, opt state, batch)", "xla_argument_bytes",
           "plan_argument_bytes"),
          ("temporaries (grads, acts, gathered)", "xla_temp_bytes",
           "plan_temp_bytes"),
          ("outputs not aliased to arguments", None, None),
          ("generated code", "xla_code_bytes", None),
          ("total", "xla_total_bytes", "plan_total_bytes"))
  for label, xla_key, plan_key in rows:
    xla = (r[xla_key] if xla_key else
           r["xla_output_bytes"] - r["xla_alias_bytes"])
    plan = r[plan_key] if plan_key else 0
    lines.append(f"{label:<40}{xla / GIB:>9.3f}"
                 + (f"{plan / GIB:>9.3f}{_ratio(xla, plan):>7}"
                    if plan_key else ""))
  fits = r["xla_total_bytes"] <= r["hbm_bytes"]
  lines.append(f"{'fits HBM' if fits else 'does NOT fit HBM'} "
               f"({r['xla_total_bytes'] / r['hbm_bytes']:.0%} of it)")
  counted = r["analytic_flops_as_xla_counts"]
  lines.append(f"FLOPs per step, all chips: XLA {r['xla_flops']:.4g}; "
               f"analytic {r['analytic_flops']:.4g}, {counted:.4g} as XLA "
               f"counts loops and remat (ratio XLA / that "
               f"{_ratio(r['xla_flops'], counted)})")
  if r["xla_windowed_loops"]:
    lines.append(f"  (XLA made {r['xla_windowed_loops']} matmuls loops over "
                 f"their weight shards and counts one pass of each: its "
                 f"FLOPs are low by up to the fsdp size)")
  return "\n".join(lines)
