"""Checkpoints of training runs: orbax CheckpointManager, run config, resume.

A run's workdir holds:

  config.json               the full run config (ml_collections, as JSON),
                            written at start; evaluation and sampling read it
                            (retro_jax.training.run_config).
  checkpoints/<step>/       one orbax checkpoint per saved step, items:
      params                the Haiku params tree (float32, sharded arrays)
      train                 {"opt_state": optax state, "step": int32 []}
      data_position         JSON {"step": s, "source": ..., "seed": ...}
      config                JSON, the run config at save time

Orbax writes each step to a temporary directory and renames it when complete,
so a run killed mid-save (even `kill -9`) leaves the previous checkpoints
intact and the next start sees only complete ones. Restores take a target
tree of `jax.ShapeDtypeStruct`s with shardings, so a checkpoint saved on one
mesh restores onto any other.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable, Dict, Optional, Tuple, Union

from etils import epath
import jax
import ml_collections
import orbax.checkpoint as ocp

from retro_jax.training import run_config

CHECKPOINT_DIR = "checkpoints"


# -- checkpoints --------------------------------------------------------------
class Checkpointer:
  """Saves and restores train states (+ data position) under
  `workdir/checkpoints`, every `save_every` steps, keeping the last `keep`.

  `state` is a `train.TrainState` (params, opt_state, step) or anything with
  those three fields.
  """

  def __init__(self, workdir: str, *, save_every: int, keep: int,
               async_save: bool = True,
               config: Optional[ml_collections.ConfigDict] = None):
    if save_every < 1:
      raise ValueError(f"checkpoint save_every must be >= 1, got {save_every}")
    if keep < 1:
      raise ValueError(f"checkpoint keep must be >= 1, got {keep}")
    self.directory = str(run_config.workdir_path(workdir, CHECKPOINT_DIR))
    self.config = config
    self.save_every = save_every
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_every, max_to_keep=keep,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True,
        create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> Optional[int]:
    """Step of the newest complete checkpoint, or None."""
    return self._manager.latest_step()

  def all_steps(self):
    return list(self._manager.all_steps())

  def save(self, step: int, state, data_position: Dict[str, Any],
           force: bool = False) -> bool:
    """Starts saving `state` at `step` if `step` is a multiple of
    `save_every` (or `force`); returns whether a save started. Asynchronous:
    see `wait`."""
    if not force and step % self.save_every:
      return False
    items = dict(
        params=ocp.args.StandardSave(state.params),
        train=ocp.args.StandardSave({"opt_state": state.opt_state,
                                     "step": state.step}),
        data_position=ocp.args.JsonSave(dict(data_position)))
    if self.config is not None:
      items["config"] = ocp.args.JsonSave(
          json.loads(self.config.to_json_best_effort()))
    return self._manager.save(int(step), args=ocp.args.Composite(**items),
                              force=True)

  def restore(self, abstract_state, step: Optional[int] = None
              ) -> Tuple[Any, Dict[str, Any]]:
    """Restores (state, data_position) at `step` (default: latest).

    Args:
      abstract_state: a TrainState of `jax.ShapeDtypeStruct`s carrying the
        target shardings (any mesh), e.g. from `abstract_with_shardings`.
    """
    step = self.latest_step() if step is None else int(step)
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    restored = self._manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_state.params),
        train=ocp.args.StandardRestore({"opt_state": abstract_state.opt_state,
                                        "step": abstract_state.step}),
        data_position=ocp.args.JsonRestore()))
    train = restored["train"]
    state = type(abstract_state)(restored["params"], train["opt_state"],
                                 train["step"])
    return state, dict(restored["data_position"])

  def data_position(self, step: Optional[int] = None
                    ) -> Optional[Dict[str, Any]]:
    """The data position stored with a checkpoint (default: the latest), read
    alone (no arrays), or None if there is no checkpoint."""
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    restored = self._manager.restore(step, args=ocp.args.Composite(
        data_position=ocp.args.JsonRestore()))
    return dict(restored["data_position"])

  def saved_config(self, step: Optional[int] = None
                   ) -> Optional[ml_collections.ConfigDict]:
    """The run config stored with a checkpoint (None if none stored)."""
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    if not epath.Path(self.directory, str(step), "config").exists():
      return None
    restored = self._manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))
    return ml_collections.ConfigDict(run_config.upgrade_legacy_fields(
        restored["config"], f"{self.directory}/{step}/config"))

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def abstract_with_shardings(abstract, shardings):
  """Tree of ShapeDtypeStructs carrying `shardings` (a restore target)."""
  return jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract, shardings)


# -- params only (evaluation, sampling, RETROfit) -----------------------------
class _ExpectedReadOnlyWarnings(logging.Filter):
  """Drops orbax's warnings about what a params-only, read-only restore
  leaves out on purpose (the other items; saving being off)."""

  EXPECTED = ("was found in the checkpoint, but could not be restored",
              "Given directory is read only", "read_only=True, setting")

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not any(e in message for e in self.EXPECTED)


def restore_params(workdir: str, step: Optional[int] = None,
                   shardings: Union[Any, Callable[[Any], Any], None] = None
                   ) -> Tuple[ml_collections.ConfigDict, Any, int]:
  """(run config, params, step) of a run's checkpoint (latest unless `step`).

  Only the params item is read. Shapes come from the checkpoint's own
  metadata, so no model is built.

  Args:
    workdir: the run folder.
    step: a checkpoint step (default: the latest).
    shardings: target shardings of the params: a tree matching them, or a
      function from the params' abstract tree (ShapeDtypeStructs) to one
      (e.g. the parameter rules on a mesh, see `train.restore_params`).
      Default: all on this process's first device.
  """
  config = run_config.load_run_config(workdir)
  directory = str(run_config.workdir_path(workdir, CHECKPOINT_DIR))
  quiet = _ExpectedReadOnlyWarnings()
  logging.getLogger("absl").addFilter(quiet)
  manager = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True,
                                                      create=False),
      item_handlers={"params": ocp.StandardCheckpointHandler()})
  try:
    step = manager.latest_step() if step is None else int(step)
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {directory}")
    if step not in manager.all_steps():
      raise FileNotFoundError(f"no checkpoint of step {step} in {directory}; "
                              f"steps: {sorted(manager.all_steps())}")
    meta = manager.item_metadata(step)["params"]
    meta = getattr(meta, "tree", meta)
    if meta is None:
      raise ValueError(f"{directory}/{step} holds no params item")
    if shardings is None:
      one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      shardings = jax.tree_util.tree_map(lambda _: one, meta)
    elif callable(shardings):
      shardings = shardings(jax.tree_util.tree_map(
          lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), meta))
    params = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(
            abstract_with_shardings(meta, shardings))))["params"]
  finally:
    manager.close()
    logging.getLogger("absl").removeFilter(quiet)
  return config, params, step
