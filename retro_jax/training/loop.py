"""The training loop: mesh, sharded state, resume, checkpoints, metrics.

`train(config, workdir)` is the whole job `scripts/train.py` runs, the same on
one CPU, one TPU VM or a multi-host pod slice (every host runs it; each reads
its own data shard; process 0 writes metrics):

  check config, workdir and mesh (errors before any compute)
  ─► abstract state + shardings (jax.eval_shape; nothing allocated)
  ─► restore the latest checkpoint onto this mesh, or initialise in place
     (jitted init with out_shardings), RETROfit: graft a baseline's weights
  ─► loop: global arrays placed one or two steps ahead by a background
     thread (prefetch.py: host batch ─► device_put) ─► jitted step (state
     donated)
     metrics one step behind (the device never waits for the host), NaN/inf
     stops the run, checkpoints every N steps, SIGTERM saves and returns
  ─► final checkpoint.

Resume is exact: batches are a function of the step, the state is restored
bit for bit, so a restarted run replays the same computation.
"""

from __future__ import annotations

import itertools
import logging
import math
import signal
from typing import Any, Dict, Optional

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from retro_jax.config import RetroConfig
from retro_jax.core import accelerators
from retro_jax.core import files
from retro_jax.core import sharding
from retro_jax.data import train_sources
from retro_jax.model import flops
from retro_jax.model.network import Retro
from retro_jax.training import checkpoints
from retro_jax.training import metrics as metrics_lib
from retro_jax.training import prefetch
from retro_jax.training import retrofit
from retro_jax.training import run_config
from retro_jax.training import step as step_lib

class NonFiniteLossError(RuntimeError):
  """The loss or gradient became NaN or inf; the run stopped."""


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming missing config sections or fields."""
  missing = []
  for section, fields in run_config.required_fields().items():
    if section not in config:
      missing.append(f"config.{section}")
      continue
    missing += [f"config.{section}.{f}" for f in fields
                if f not in config[section]]
  if missing:
    raise ValueError(f"the training config lacks {', '.join(missing)} "
                     f"(configs/base.py states every field)")
  tc = config.train
  if tc.trainable not in step_lib.TRAINABLE:
    raise ValueError(f"config.train.trainable must be one of "
                     f"{step_lib.TRAINABLE}, got {tc.trainable!r}")
  if tc.trainable == "retrieval" and not tc.init_from:
    raise ValueError("config.train.trainable='retrieval' (RETROfit) needs "
                     "config.train.init_from: the workdir of a trained "
                     "baseline (no-CCA) run")
  if tc.steps < 1 or tc.log_every < 1:
    raise ValueError("config.train.steps and log_every must be >= 1")


def abstract_batch(cfg: RetroConfig, batch_size: int, seq_len: int):
  """ShapeDtypeStructs of one global batch."""
  if seq_len % cfg.chunk_size:
    raise ValueError(f"config.train.seq_len={seq_len} is not a multiple of "
                     f"the chunk size {cfg.chunk_size}")
  l = seq_len // cfg.chunk_size
  i32 = jnp.int32
  return {"tokens": jax.ShapeDtypeStruct((batch_size, seq_len), i32),
          "neighbours": jax.ShapeDtypeStruct(
              (batch_size, l, cfg.num_neighbours, cfg.neighbour_len), i32),
          "loss_mask": jax.ShapeDtypeStruct((batch_size, seq_len), i32)}


def _check_checkpoint_model(ckpt: checkpoints.Checkpointer,
                            config: ml_collections.ConfigDict) -> None:
  saved = ckpt.saved_config()
  if saved is None or "model" not in saved:
    return
  diffs = run_config.model_differences(saved.model.to_dict(),
                                        config.model.to_dict())
  if diffs:
    raise ValueError(f"the checkpoint in {ckpt.directory} (step "
                     f"{ckpt.latest_step()}) is of another model "
                     f"architecture: {'; '.join(diffs)}")


# Data position fields that identify the input stream: a resumed run whose
# fields differ would replay or skip data.
STREAM_FIELDS = ("source", "seed", "task_name", "split", "num_shards",
                 "host_batch_size")


def _check_data_position(ckpt: checkpoints.Checkpointer,
                         current: Dict[str, Any], allow_change: bool) -> None:
  """Raises ValueError if the checkpoint's data stream differs from this
  run's (fields absent from older checkpoints are not compared)."""
  saved = ckpt.data_position() or {}
  diffs = [f"{k}: saved {saved[k]!r}, now {current[k]!r}"
           for k in STREAM_FIELDS if k in saved and saved[k] != current[k]]
  if not diffs:
    return
  msg = (f"the checkpoint in {ckpt.directory} (step {ckpt.latest_step()}) "
         f"was trained on another data stream: {'; '.join(diffs)}")
  if allow_change:
    logging.warning("%s; continuing (config.train.allow_data_change)", msg)
    return
  raise ValueError(f"{msg}. Resuming would replay or skip data: restore the "
                   f"saved data settings, use a new --workdir, or set "
                   f"config.train.allow_data_change=True")


def _retrofit_params(config, model_cfg: RetroConfig, params, param_sharding,
                     mesh):
  """`params` with the non-retrieval weights of `train.init_from`."""
  base_dir = config.train.init_from   # Set: `check_config` made sure.
  base_config = run_config.load_run_config(base_dir)
  retrofit.check_baseline(RetroConfig.from_dict(base_config.model), model_cfg)
  _, base_params, base_step = step_lib.restore_params(base_dir, mesh=mesh)
  logging.info("RETROfit: baseline weights from %s step %d", base_dir,
               base_step)
  return jax.jit(retrofit.graft, out_shardings=param_sharding)(params,
                                                               base_params)


class _SigtermFlag:
  """Whether to stop for a preemption (SIGTERM) at a step; restores the old
  signal handler on exit."""

  def __init__(self):
    self.raised = False
    self._old = None

  def __enter__(self):
    # Multi-host: jax.distributed's preemption service catches SIGTERM and
    # picks a step all hosts stop at (`stop_now`); single host: our handler.
    if jax.process_count() == 1:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.raised = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)

  def stop_now(self, step: int) -> bool:
    if jax.process_count() > 1:   # All hosts stop at the same step.
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except Exception:  # pylint: disable=broad-except
        pass   # No preemption service: each host's own SIGTERM.
    return self.raised


def train(config: ml_collections.ConfigDict, workdir: str,
          source: Optional[train_sources.DataSource] = None,
          devices=None,
          prefetch_depth: int = prefetch.DEPTH) -> Dict[str, Any]:
  """Trains (or resumes) the run in `workdir`.

  Args:
    config: the run config (configs/base.py states every field).
    workdir: run folder; an existing run there is resumed.
    source: `start_step -> iterator` of host batches (default: the one
      `config.data.source` names).
    devices: the mesh's devices (default: all).
    prefetch_depth: batches read and placed on the devices ahead of the
      step by a background thread (prefetch.py); 0 reads each in the loop's
      thread, just before its step.
  Returns:
    {"status": "done" | "preempted", "step", "metrics" (last logged),
     "state" (the final TrainState)}.
  """
  check_config(config)
  run_config.check_same_model(workdir, config)
  cfg = RetroConfig.from_dict(config.model)
  tc, cc = config.train, config.checkpoint
  mesh = sharding.make_mesh(dict(config.mesh), devices)
  step_lib.check_accumulation(tc.batch_size, tc.accum_steps, mesh)
  # The data shards the global batch is read in: with their number fixed,
  # the stream is the same on any process count (train_sources).
  _, num_shards = train_sources.shards_read(
      config, sharding.host_batch_shard(mesh, tc.batch_size))

  def position(step):   # The data position a checkpoint records.
    return dict(train_sources.data_position(config, step),
                num_shards=num_shards,
                host_batch_size=tc.batch_size // num_shards)
  batch_abs = abstract_batch(cfg, tc.batch_size, tc.seq_len)
  source = source or train_sources.make_source(config, mesh)
  # The rows record holds what each step trained on. The source is read
  # ahead of the step, so the record is taken where the batch is read (the
  # reading thread, in order) and appended only when the step takes it: a
  # run that stops leaves no line for a batch it read but did not train.
  record_path = rows_path(workdir) if config.data.record_rows else None

  model = Retro(cfg)
  schedule = step_lib.make_schedule(tc.learning_rate, tc.warmup_steps,
                                     tc.total_steps, tc.end_lr_ratio)
  optimizer = step_lib.make_optimizer(
      tc.learning_rate, tc.warmup_steps, tc.total_steps, tc.end_lr_ratio,
      weight_decay=tc.weight_decay, b2=tc.b2, clip_norm=tc.clip_norm or None,
      retrieval_lr_scale=tc.get("retrieval_lr_scale", 1.0))
  abstract, state_sh, _ = step_lib.state_shardings(
      model, optimizer, mesh, batch_abs, trainable=tc.trainable)

  ckpt = checkpoints.Checkpointer(workdir, save_every=cc.every, keep=cc.keep,
                                  async_save=cc.async_save, config=config)
  start = ckpt.latest_step()
  if start is not None:
    _check_checkpoint_model(ckpt, config)
    _check_data_position(ckpt, position(start),
                         tc.allow_data_change)
    state, saved = ckpt.restore(
        checkpoints.abstract_with_shardings(abstract, state_sh))
    start = int(saved["step"])
    logging.info("resumed from %s step %d", ckpt.directory, start)
  else:
    start = 0
    with jax.set_mesh(mesh):
      state = step_lib.init_sharded_state(
          model, optimizer, state_sh, jax.random.key(tc.seed), batch_abs,
          tc.trainable)
      if tc.trainable == "retrieval":
        state = state._replace(params=_retrofit_params(
            config, cfg, state.params, state_sh.params, mesh))
  run_config.save_run_config(workdir, config)

  if jax.process_index() == 0:
    n_params = sum(math.prod(x.shape) for x in
                   jax.tree_util.tree_leaves(abstract.params))
    print(f"model: {n_params:,} parameters; mesh {dict(mesh.shape)} over "
          f"{jax.device_count()} devices / {jax.process_count()} hosts; "
          f"start step {start} of {tc.steps}", flush=True)

  step_fn = step_lib.jit_train_step(model, optimizer, mesh, state_sh,
                                     batch_abs, tc.trainable, tc.accum_steps)
  logger = metrics_lib.MetricsLogger(
      workdir, total_steps=tc.steps,
      tokens_per_step=tc.batch_size * tc.seq_len,
      flops_per_step=flops.train_flops(cfg, tc.batch_size,
                                       tc.seq_len)["total"],
      peak_flops=accelerators.device_peak_flops(tc.peak_flops),
      num_devices=jax.device_count(), schedule=schedule)
  summary = {"status": "done", "metrics": {}}
  step = start
  steps_read = itertools.count(start)   # The reading thread's count.

  def place(host_batch):
    """(rows record or None, global arrays): runs in the reading thread."""
    record = (train_sources.rows_record(next(steps_read), host_batch)
              if record_path else None)
    return record, prefetch.place_batch(host_batch, mesh, batch_abs)

  try:
    # Leaving the block in any way (done, an error, a SIGTERM break) stops
    # the reading thread before the checkpointer is closed.
    with _SigtermFlag() as sigterm, jax.set_mesh(mesh), prefetch.Prefetcher(
        source(start), place, depth=prefetch_depth) as batches:
      pending = None   # (step, device metrics) of the previous step.

      def settle(item):
        """Fetches a step's metrics; raises on NaN or inf."""
        at, metrics = item
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not (math.isfinite(host["loss"]) and
                math.isfinite(host["grad_norm"])):
          last = ckpt.latest_step()
          raise NonFiniteLossError(
              f"non-finite loss {host['loss']} / grad norm "
              f"{host['grad_norm']} at step {at}: stopping. The last good "
              f"checkpoint is step {last} in {ckpt.directory}"
              if last is not None else
              f"non-finite loss {host['loss']} at step {at}: stopping "
              f"(no checkpoint was saved yet)")
        logger.add(host)
        if at % tc.log_every == 0 or at == tc.steps:
          summary["metrics"] = logger.write(at)

      while step < tc.steps:
        record, batch = next(batches)   # Already on the devices.
        if record is not None:
          train_sources.append_record(record_path, record)
        state, metrics = step_fn(state, batch)
        step += 1
        if pending is not None:
          settle(pending)
        pending = (step, metrics)
        if step == start + 1:
          jax.block_until_ready(metrics)
          logger.start_timer(step)   # Exclude compilation from throughput.
        stop = sigterm.stop_now(step)
        if stop or step == tc.steps or step % cc.every == 0:
          settle(pending)            # Never checkpoint a non-finite state.
          pending = None
          ckpt.save(step, state, position(step),
                    force=stop or step == tc.steps)
        if stop:
          summary["status"] = "preempted"
          print(f"SIGTERM: saved step {step} to {ckpt.directory}; exiting",
                flush=True)
          break
      if pending is not None:
        settle(pending)
  finally:
    ckpt.wait()
    ckpt.close()
    logger.close()
  summary.update(step=step, state=state)
  return summary


def rows_path(workdir: str, process: Optional[int] = None) -> str:
  """Where a process (default: this one) records the rows each step trained
  on (`config.data.record_rows`); a local workdir only."""
  process = jax.process_index() if process is None else process
  path = run_config.workdir_path(workdir, "rows", f"process_{process}.jsonl")
  if not files.is_local(str(path)):
    raise ValueError(f"config.data.record_rows needs a local --workdir, "
                     f"got {workdir}")
  return str(path)


def host_params(state) -> Dict[str, Dict[str, np.ndarray]]:
  """Params of a state as host numpy arrays (tests, comparisons)."""
  return jax.tree_util.tree_map(np.asarray, jax.device_get(state.params))
