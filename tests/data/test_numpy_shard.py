"""retro_jax.data.numpy_shard and scripts/export_batches.py: a round trip is
exact, an existing file is kept, bad files are one line naming the file and
the field, the module loads without TensorFlow, seqio, ScaNN or Beam, and the
exported batches are those training reads from a real cached Task."""

import os
import subprocess
import sys

import numpy as np
import pytest

from retro_jax.data import numpy_shard
from conftest import REPO_ROOT

META = dict(task_name="retro_test", cache_dir="/cache", split="train",
            seq_len=128, batch_size=4, num_neighbours=2, neighbour_len=16,
            vocab_size=512, created_by="test")


def make_batches(count=3, b=4, n=128, l=2, k=2, r=16, seed=0):
  """`count` batches {tokens int32 [b, n], neighbours int32 [b, l, k, r],
  loss_mask int32 [b, n]} of random ids."""
  rng = np.random.default_rng(seed)
  return [{"tokens": rng.integers(1, 512, (b, n), np.int32),
           "neighbours": rng.integers(1, 512, (b, l, k, r), np.int32),
           "loss_mask": rng.integers(0, 2, (b, n), np.int32)}
          for _ in range(count)]


def test_round_trip_is_exact(tmp_path):
  path = str(tmp_path / "sub" / "batches.npz")
  batches = make_batches()
  size = numpy_shard.write(path, batches, META)
  assert size == os.path.getsize(path)
  assert os.listdir(tmp_path / "sub") == ["batches.npz"]  # No temp left.
  meta, got = numpy_shard.read(path)
  assert meta == dict(META, format=numpy_shard.FORMAT, num_batches=3)
  assert len(got) == len(batches)
  for g, w in zip(got, batches):
    assert g.keys() == set(numpy_shard.KEYS)
    for k in numpy_shard.KEYS:
      assert g[k].dtype == w[k].dtype and g[k].shape == w[k].shape
      np.testing.assert_array_equal(g[k], w[k])


def test_refuses_to_overwrite_unless_asked(tmp_path):
  path = str(tmp_path / "batches.npz")
  numpy_shard.write(path, make_batches(seed=0), META)
  with pytest.raises(numpy_shard.ShardExists,
                     match=rf"^{path}: exists; pass overwrite=True"):
    numpy_shard.write(path, make_batches(seed=1), META)
  assert issubclass(numpy_shard.ShardExists, FileExistsError)
  before = numpy_shard.read(path)[1][0]["tokens"]
  np.testing.assert_array_equal(before, make_batches(seed=0)[0]["tokens"])
  numpy_shard.write(path, make_batches(seed=1), META, overwrite=True)
  np.testing.assert_array_equal(numpy_shard.read(path)[1][0]["tokens"],
                                make_batches(seed=1)[0]["tokens"])
  assert os.listdir(tmp_path) == ["batches.npz"]


def one_line(error) -> str:
  message = str(error.value)
  assert "\n" not in message
  return message


@pytest.mark.parametrize("content", [b"", b"garbage, not a zip", "truncated",
                                     "npy"])
def test_a_file_that_is_not_a_shard_names_the_file(tmp_path, content):
  path = tmp_path / "batches.npz"
  if content == "truncated":
    numpy_shard.write(str(path), make_batches(), META)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
  elif content == "npy":
    with open(path, "wb") as f:
      np.save(f, np.zeros(3))
  else:
    path.write_bytes(content)
  with pytest.raises(numpy_shard.ShardError) as error:
    numpy_shard.read(str(path))
  assert one_line(error).startswith(f"{path}: ")
  assert isinstance(error.value, ValueError)   # cli.BadInput: one line.


def test_a_missing_file_names_the_file(tmp_path):
  path = str(tmp_path / "nope.npz")
  with pytest.raises(numpy_shard.ShardError,
                     match=rf"^{path}: no such file"):
    numpy_shard.read(path)


def _rewrite(path, drop=(), **replace):
  """The npz at `path` without `drop` and with `replace`d arrays."""
  with np.load(path) as npz:
    arrays = {k: npz[k] for k in npz.files if k not in drop}
  arrays.update(replace)
  with open(path, "wb") as f:
    np.savez(f, **arrays)


@pytest.mark.parametrize("key", ["tokens", "neighbours", "loss_mask", "meta"])
def test_a_missing_key_names_the_key(tmp_path, key):
  path = str(tmp_path / "batches.npz")
  numpy_shard.write(path, make_batches(), META)
  _rewrite(path, drop=(key,))
  with pytest.raises(numpy_shard.ShardError) as error:
    numpy_shard.read(path)
  assert one_line(error).startswith(f"{path}: {key}: missing")


def test_inconsistent_shapes_name_the_field(tmp_path):
  path = str(tmp_path / "batches.npz")
  numpy_shard.write(path, make_batches(), META)
  _rewrite(path, loss_mask=np.zeros((3, 4, 64), np.int32))
  with pytest.raises(numpy_shard.ShardError,
                     match=rf"^{path}: loss_mask: n = 64 .* but 128"):
    numpy_shard.read(path)
  _rewrite(path, loss_mask=np.zeros((3, 4, 128), np.int32),
           neighbours=np.zeros((3, 4, 2, 2), np.int32))
  with pytest.raises(numpy_shard.ShardError,
                     match=rf"^{path}: neighbours: shape \(3, 4, 2, 2\) is "
                     r"not \[N, b, L, k, r\]"):
    numpy_shard.read(path)
  # The arrays agree, but not with what meta says they are.
  with pytest.raises(numpy_shard.ShardError,
                     match=r"meta: seq_len 256 but the arrays have n = 128"):
    numpy_shard.write(path, make_batches(), dict(META, seq_len=256),
                      overwrite=True)


def test_write_names_a_batch_without_a_key(tmp_path):
  batches = make_batches()
  del batches[1]["neighbours"]
  path = str(tmp_path / "b.npz")
  with pytest.raises(numpy_shard.ShardError,
                     match=rf"^{path}: neighbours: missing from batch 1$"):
    numpy_shard.write(path, batches, META)
  with pytest.raises(numpy_shard.ShardError, match="different shapes"):
    numpy_shard.write(path, make_batches()[:1] + make_batches(b=2)[:1], {})
  assert not os.path.exists(path)


def test_source_cycles_in_order_from_the_start_step():
  batches = make_batches(count=3)
  source = numpy_shard.source(batches)
  got = [b for _, b in zip(range(5), source(2))]
  assert [g is batches[i] for g, i in zip(got, [2, 0, 1, 2, 0])] == [True] * 5
  with pytest.raises(ValueError, match="no batches"):
    numpy_shard.source([])


BLOCKER = """
import sys
BLOCKED = {"tensorflow", "seqio", "scann", "apache_beam"}
class Block:
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in BLOCKED:
      raise ImportError(f"{name} is blocked: a host without it")
    return None
sys.meta_path.insert(0, Block())
try:
  import tensorflow
except ImportError:
  pass
else:
  raise SystemExit("the blocker let tensorflow in")
import retro_jax.data.numpy_shard as numpy_shard
meta, batches = numpy_shard.read(sys.argv[1])
print(meta["task_name"], len(batches), batches[0]["tokens"].shape)
"""


def test_reads_on_a_host_without_tensorflow_seqio_scann_or_beam(tmp_path):
  path = str(tmp_path / "batches.npz")
  numpy_shard.write(path, make_batches(), META)
  out = subprocess.run([sys.executable, "-c", BLOCKER, path], cwd=REPO_ROOT,
                       env={**os.environ, "PYTHONPATH": REPO_ROOT},
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split() == ["retro_test", "3", "(4,", "128)"]


# -- scripts/export_batches.py ------------------------------------------------
def _export(*args, timeout=300):
  env = {**os.environ, "PYTHONPATH": REPO_ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}
  env.pop("XLA_FLAGS", None)   # One device, as a user's CPU run.
  return subprocess.run(
      [sys.executable, os.path.join("scripts", "export_batches.py"), *args],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True,
      timeout=timeout)


def test_export_refuses_a_config_that_does_not_read_a_task(tmp_path):
  out = _export("--config=configs/tiny.py", f"--out={tmp_path}/b.npz")
  assert out.returncode == 2
  assert out.stderr.strip().splitlines()[-1] == (
      "scripts/export_batches.py: error: config.data.source is "
      "'synthetic': the export reads the cached Task; pass "
      "--config.data.source=task and its config.data fields")
  existing = tmp_path / "old.npz"
  existing.write_bytes(b"keep me")
  out = _export("--config=configs/quickstart.py", f"--out={existing}")
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1] == (
      f"scripts/export_batches.py: error: {existing}: exists; pass "
      f"--overwrite to replace it")
  assert existing.read_bytes() == b"keep me"


@pytest.mark.slow
def test_export_writes_the_batches_training_reads(stdlib_task, tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  import task_cache  # pylint: disable=g-import-not-at-top
  from retro_jax.core import sharding  # pylint: disable=g-import-not-at-top
  from retro_jax.data import train_sources  # pylint: disable=g-import-not-at-top
  from retro_jax.training import run_config  # pylint: disable=g-import-not-at-top
  path = tmp_path / "batches.npz"
  out = _export("--config=configs/tiny.py", f"--out={path}", "--batches=3",
                "--config.train.batch_size=4",
                *task_cache.training_flags(stdlib_task))
  assert out.returncode == 0, out.stderr[-3000:]
  size = os.path.getsize(path)
  assert out.stdout.strip().splitlines()[-1] == (
      f"wrote {path}: 3 batches x 4 x {task_cache.SEQ_LEN} tokens "
      f"(neighbours [{task_cache.SEQ_LEN // 64}, {task_cache.K}, 128]) of "
      f"{task_cache.NAME}/train, {size:,} bytes")
  meta, got = numpy_shard.read(str(path))
  assert meta["task_name"] == task_cache.NAME
  assert meta["cache_dir"] == stdlib_task["cache_dir"]
  assert (meta["split"], meta["batch_size"], meta["seq_len"]) == (
      "train", 4, task_cache.SEQ_LEN)
  assert meta["vocab_size"] == task_cache.VOCAB_SIZE
  assert "--batches=3" in meta["created_by"]

  # What training reads for the same config (config.data.source="task").
  config = run_config.load_config_file(
      os.path.join(REPO_ROOT, "configs", "tiny.py"))
  config.data.update(dict(
      source="task", task_name=task_cache.NAME, corpus="python_stdlib",
      db_dir=stdlib_task["db_dir"], spm_path=stdlib_task["spm_path"],
      cache_dir=stdlib_task["cache_dir"]))
  config.data.max_bytes.update(dict(train=task_cache.MAX_BYTES,
                                    validation=task_cache.MAX_BYTES))
  config.train.update(dict(batch_size=4, seq_len=task_cache.SEQ_LEN))
  config.model.update(dict(num_neighbours=task_cache.K,
                           vocab_size=task_cache.VOCAB_SIZE))
  mesh = sharding.make_mesh({"data": -1}, jax.devices()[:1])
  want = [b for _, b in zip(range(3),
                            train_sources.make_source(config, mesh)(0))]
  assert len(got) == 3
  for g, w in zip(got, want):
    for k in numpy_shard.KEYS:
      assert g[k].dtype == w[k].dtype, k
      np.testing.assert_array_equal(g[k], w[k], err_msg=k)
  assert not np.array_equal(got[0]["tokens"], got[1]["tokens"])
