"""Device mesh and sharding rules.

Haiku parameters carry no sharding metadata, so sharding is decided by
regexes over parameter paths (`module/…/name`), first match wins, giving each
dimension a *logical* axis; logical axes map to mesh axes (`data`, `fsdp`,
`model`) through `LOGICAL_TO_MESH`. Change either table to try another layout.

Mesh shapes come from config as a mapping axis -> size where one size may be
-1 ("fill with the remaining devices").
"""

from __future__ import annotations

import logging
import math
import re
from typing import Mapping, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "model")

# Logical axis -> mesh axis (or tuple of axes, or None = replicated).
LOGICAL_TO_MESH = {
    "batch": ("data", "fsdp"),
    "length": None,
    "embed": "fsdp",
    "heads": "model",
    "mlp": "model",
    "vocab": "model",
    "head_dim": None,
    "qkv": None,
    "norm": None,
}

# (path regex, logical axes per dimension). Paths look like
# "decoder/layer_03/self_attention/w_qkv".
PARAM_RULES: Tuple[Tuple[str, Tuple[Optional[str], ...]], ...] = (
    (r"(^|/)(embed|enc_embed)/embeddings$", ("vocab", "embed")),
    (r"(^|/)output/w$", ("embed", "vocab")),
    (r"(^|/)enc_embed_proj/w$", ("embed", None)),
    (r"/w_qkv$", ("embed", "qkv", "heads", "head_dim")),
    (r"/w_kv$", ("embed", "qkv", "heads", "head_dim")),
    (r"/w_q$", ("embed", "heads", "head_dim")),
    (r"/w_o$", ("heads", "head_dim", "embed")),
    (r"/w_in$", ("embed", "mlp")),
    (r"/w_out$", ("mlp", "embed")),
    (r"norm/scale$", ("norm",)),
    (r"/b_[qk]$", ("heads", None, "head_dim")),
)


# -- mesh ---------------------------------------------------------------------
def mesh_shape(axes: Mapping[str, int], num_devices: int) -> Tuple[int, ...]:
  """Resolves sizes (one may be -1) into a tuple over MESH_AXES."""
  unknown = sorted(set(axes) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"unknown mesh axes {unknown}; axes are {MESH_AXES}")
  sizes = [int(axes.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {dict(axes)}: at most one axis may be -1")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh {dict(axes)}: sizes must be positive or -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"mesh {dict(axes)} does not divide {num_devices} "
                       f"devices: the fixed axes multiply to {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh {dict(axes)} needs {math.prod(sizes)} devices but "
                     f"{num_devices} are available")
  return tuple(sizes)


def make_mesh(axes: Mapping[str, int],
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A mesh over MESH_AXES, e.g. make_mesh({'data': -1, 'model': 2})."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(axes, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


# -- parameters ---------------------------------------------------------------
# Parameters of a scanned run of layers carry one leading (layer) dimension.
_STACKED = re.compile(r"(^|/)layers_\d+_\d+/")


def logical_axes_of(path: str, ndim: int) -> Optional[Tuple[Optional[str], ...]]:
  """Logical axes of the first rule matching `path`, or None if none does."""
  stacked = bool(_STACKED.search(path))
  for pattern, axes in PARAM_RULES:
    if re.search(pattern, path):
      axes = (None,) + tuple(axes) if stacked else tuple(axes)
      if len(axes) != ndim:
        raise ValueError(f"sharding rule {pattern!r} names {len(axes)} axes "
                         f"but parameter {path} has {ndim} dimensions")
      return axes
  return None


def spec_for(shape: Sequence[int], logical: Sequence[Optional[str]],
             mesh: Mesh) -> P:
  """PartitionSpec of logical axes on `mesh`; a mesh axis that does not divide
  its dimension (or is already used) is dropped for that dimension."""
  used, out = set(), []
  for dim, name in zip(shape, logical):
    target = LOGICAL_TO_MESH.get(name) if name else None
    names = (target,) if isinstance(target, str) else tuple(target or ())
    keep = tuple(a for a in names if a in mesh.shape and a not in used)
    size = math.prod(mesh.shape[a] for a in keep)
    if not keep or dim % size:
      out.append(None)
      continue
    used.update(keep)
    out.append(keep[0] if len(keep) == 1 else keep)
  return P(*out)


def _path_str(path) -> str:
  return "/".join(getattr(k, "key", str(k)) for k in path)


def param_specs(params, mesh: Mesh, strict: bool = False):
  """PartitionSpecs for a params tree (arrays or ShapeDtypeStructs).

  Unmatched parameters are replicated with a warning, or raise with
  `strict=True`. Returns (specs tree, list of unmatched paths).
  """
  unmatched = []

  def one(path, leaf):
    name = _path_str(path)
    logical = logical_axes_of(name, len(leaf.shape))
    if logical is None:
      unmatched.append(name)
      return P()
    return spec_for(leaf.shape, logical, mesh)

  specs = jax.tree_util.tree_map_with_path(one, params)
  if unmatched:
    msg = f"no sharding rule matches {unmatched}; they are replicated"
    if strict:
      raise ValueError(msg)
    logging.warning(msg)
  return specs, unmatched


def named(mesh: Mesh, specs):
  """Tree of PartitionSpecs -> tree of NamedShardings on `mesh`."""
  return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Shards the leading (batch) dimension over the data-parallel axes."""
  return NamedSharding(mesh, spec_for((0,) + (1,) * (ndim - 1),
                                      ("batch",) + (None,) * (ndim - 1), mesh))


def check_batch_divides(batch_size: int, mesh: Mesh) -> None:
  data = math.prod(mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape)
  if batch_size % data:
    raise ValueError(f"batch size {batch_size} does not divide over the "
                     f"data-parallel mesh axes data x fsdp = {data}")


# -- activations --------------------------------------------------------------
def constrain(x: jax.Array, logical: Sequence[Optional[str]]) -> jax.Array:
  """Sharding constraint on an activation under the mesh set with
  `jax.set_mesh`; a no-op when no mesh is set (single device, tests)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
    return x
  spec = spec_for(x.shape, logical, mesh)
  return jax.lax.with_sharding_constraint(x, spec)


def global_batch(batch, mesh: Mesh):
  """Host numpy batch -> global arrays sharded over the batch axes."""
  return jax.tree_util.tree_map(
      lambda a: jax.make_array_from_process_local_data(
          batch_sharding(mesh, np.ndim(a)), np.asarray(a)), batch)


# -- host data shards ---------------------------------------------------------
def row_shards(device_rows: Sequence[Tuple[int, int, int]], process: int
               ) -> Tuple[int, int]:
  """(shard index, number of shards) of `process`'s rows of the batch.

  Args:
    device_rows: (process index, first row, end row) of every device's block
      of the global batch.
    process: the process to place.
  Processes whose devices hold the same rows (replicas, e.g. when the `model`
  axis spans hosts) get the same shard; the distinct row ranges must tile the
  batch in equal contiguous blocks.
  """
  ranges = {}
  for p, start, stop in device_rows:
    lo, hi = ranges.get(p, (start, stop))
    ranges[p] = (min(lo, start), max(hi, stop))
  blocks = sorted(set(ranges.values()))
  ends = [0] + [hi for _, hi in blocks]
  if ([lo for lo, _ in blocks] != ends[:-1] or
      len({hi - lo for lo, hi in blocks}) != 1):
    raise ValueError(f"the batch rows of the processes {ranges} do not tile "
                     f"the batch in equal contiguous blocks")
  return blocks.index(ranges[process]), len(blocks)


def host_batch_shard(mesh: Mesh, batch_size: int,
                     process: Optional[int] = None) -> Tuple[int, int]:
  """(shard index, number of shards) of the rows this process (default
  `jax.process_index()`) must read so `global_batch` builds a consistent
  array: hosts that hold replicas of the same rows read the same shard."""
  check_batch_divides(batch_size, mesh)
  indices = batch_sharding(mesh, 1).devices_indices_map((batch_size,))
  rows = [(d.process_index,) + idx[0].indices(batch_size)[:2]
          for d, idx in indices.items()]
  return row_shards(rows, jax.process_index() if process is None else process)
