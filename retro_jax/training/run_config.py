"""The run config: its schema (configs/base.py) and its file (config.json).

configs/base.py states every field of a run once. The experiment configs
start from it (`base_config()`), and the training loop requires exactly its
fields (`required_fields()`), so a field is added in one place.

A run's workdir keeps the config it trained with in `config.json`; evaluation
and sampling read it back with `load_run_config`. Runs written before the
data fields took their present form are read in the present form
(`upgrade_legacy_fields`):

  data.max_bytes        an int for every split, with per-split overrides in
  data.split_max_bytes  the string "validation=N,..."
                        -> data.max_bytes {split: bytes}
  data.meta_filter      the string "key=value,..." -> data.meta {key: value}
  data.spm_model        -> data.spm_path
  db.max_bytes          dropped: the DB now holds the training split, plus
                        db.extra
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from typing import Any, Dict, Mapping, Tuple

from etils import epath
import jax
import ml_collections

from retro_jax.core import files

CONFIG_FILE = "config.json"
# configs/ sits beside the retro_jax package in the repository.
CONFIGS_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
        __file__)))), "configs")
BASE_CONFIG = os.path.join(CONFIGS_DIR, "base.py")
# The splits a Task offered before data.max_bytes named them.
LEGACY_SPLITS = ("train", "validation")


# -- config files -------------------------------------------------------------
def load_config_file(path: str, *args: Any) -> ml_collections.ConfigDict:
  """`get_config(*args)` of a config file (configs/ is not a package, so
  config files are loaded by path, as ml_collections' config_flags does)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such config file")
  name = "retro_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


def base_config() -> ml_collections.ConfigDict:
  """A fresh copy of configs/base.py: every field of a run."""
  return load_config_file(BASE_CONFIG)


@functools.lru_cache(maxsize=1)
def required_fields() -> Dict[str, Tuple[str, ...]]:
  """{section: fields} every training config must have: those of
  configs/base.py. `model` is checked by `RetroConfig.from_dict` instead
  (it names unknown fields; missing ones take their defaults)."""
  base = base_config()
  return {section: () if section == "model" else tuple(base[section].keys())
          for section in base.keys()}


# -- config.json --------------------------------------------------------------
def workdir_path(workdir: str, *parts: str) -> epath.Path:
  """A path in a run folder, local or cloud (gs://); local ones are made
  absolute."""
  root = str(workdir)
  if files.is_local(root):
    root = os.path.abspath(root)
  return epath.Path(root).joinpath(*parts)


def config_path(workdir: str) -> epath.Path:
  """Where a run's config is kept."""
  return workdir_path(workdir, CONFIG_FILE)


def save_run_config(workdir: str, config: ml_collections.ConfigDict) -> str:
  """Writes the run config to `workdir/config.json` (process 0 only;
  atomically). Returns the path."""
  path = config_path(workdir)
  if jax.process_index() == 0:
    # to_json_best_effort also writes values plain JSON cannot (tuples as
    # lists, field references resolved).
    files.write_json(path, json.loads(config.to_json_best_effort()),
                     indent=2)
  return str(path)


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The run config saved by `save_run_config`, with legacy fields upgraded
  (see the module docstring)."""
  path = config_path(workdir)
  if not path.exists():
    raise FileNotFoundError(f"{path}: no run config; is {workdir} the workdir "
                            f"of a training run?")
  return ml_collections.ConfigDict(
      upgrade_legacy_fields(files.read_json(path), str(path)))


def _pairs(text: str, field: str) -> Dict[str, str]:
  """"a=x,b=y" -> {"a": "x", "b": "y"} (the legacy string form)."""
  out = {}
  for item in filter(None, (s.strip() for s in text.split(","))):
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise ValueError(f"{field} item {item!r} is not key=value")
    out[key.strip()] = value.strip()
  return out


def upgrade_legacy_fields(values: Mapping[str, Any],
                          source: str = "config") -> Dict[str, Any]:
  """`values` (a run config as plain data) with its legacy data fields in
  their present form; a config already in that form is returned unchanged.

  Raises ValueError naming the field and `source` when a legacy field
  cannot be read.
  """
  values = dict(values)
  if isinstance(values.get("db"), Mapping) and "max_bytes" in values["db"]:
    values["db"] = {k: v for k, v in values["db"].items() if k != "max_bytes"}
  data = values.get("data")
  if not isinstance(data, Mapping):
    return values
  data = dict(data)
  try:
    if "spm_model" in data:
      legacy = data.pop("spm_model")
      data["spm_path"] = data.get("spm_path") or legacy
    per_split = data.pop("split_max_bytes", "")
    if isinstance(per_split, str):
      per_split = _pairs(per_split, "data.split_max_bytes")
    if "max_bytes" in data and not isinstance(data["max_bytes"], Mapping):
      every = int(data["max_bytes"] or 0)
      data["max_bytes"] = {split: every for split in LEGACY_SPLITS}
    if per_split:
      data["max_bytes"] = {**data.get("max_bytes", {}),
                           **{k: int(v) for k, v in per_split.items()}}
    if "meta_filter" in data:
      meta = data.pop("meta_filter") or {}
      if isinstance(meta, str):
        meta = _pairs(meta, "data.meta_filter")
      data["meta"] = {**dict(meta), **dict(data.get("meta") or {})}
  except ValueError as e:
    raise ValueError(f"{source}: {e}") from None
  values["data"] = data
  return values


# -- architecture check -------------------------------------------------------
# Model fields that choose how the network is computed, not what it is: the
# parameters and the function are the same whatever their value (attention:
# reference or fused kernels, model/fused_attention.py), so a run may resume
# with another value, and a config saved before the field existed, which
# lacks it, is not refused either.
IMPLEMENTATION_FIELDS = ("attention",)


def model_differences(saved: Dict[str, Any], current: Dict[str, Any]) -> list:
  """Model fields whose values differ (lists and tuples compare equal),
  IMPLEMENTATION_FIELDS aside."""
  def norm(v):
    return list(v) if isinstance(v, (list, tuple)) else v
  keys = sorted((set(saved) | set(current)) - set(IMPLEMENTATION_FIELDS))
  return [f"{k}: saved {saved.get(k)!r}, now {current.get(k)!r}"
          for k in keys if norm(saved.get(k)) != norm(current.get(k))]


def check_same_model(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Raises ValueError if `workdir` holds a run of another architecture.

  Compares `config.model` with the saved run config (if any); training
  fields (steps, learning rate, ...) may change between restarts.
  """
  path = config_path(workdir)
  if not path.exists():
    return
  saved = load_run_config(workdir)
  diffs = model_differences(saved.model.to_dict(), config.model.to_dict())
  if diffs:
    raise ValueError(
        f"{path} describes another model architecture than this run's "
        f"config.model; differing fields: {'; '.join(diffs)}. Use a new "
        f"--workdir, or the saved config.")
