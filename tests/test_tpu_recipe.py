"""docs/tpu.md's Cloud TPU recipe, end to end, against a bucket on localhost.

The recipe's own commands are read from docs/tpu.md and run as written,
with three substitutions: gs://BUCKET is a bucket of the GCS stand-in
(tests/gcs_emulator.py), C4 is a Pile-layout corpus on that bucket, and the
172m preset is the tiny one (with a few flags to make it a minute's work).
Every artifact (vocabulary, DB, neighbour cache, checkpoints, metrics,
evaluation results) goes to the bucket through its own client: ours
(etils.epath), TensorFlow's (seqio's cache, TensorBoard) and tensorstore's
(orbax). Nothing may appear in a local folder named "gs:".
"""

import json
import os
import subprocess
import sys

from etils import epath
import pytest
import zstandard

from conftest import REPO_ROOT
from gcs_emulator import GcsEmulator
from readme_shell import readme_commands
from retro_jax.corpus import sources
from retro_jax.evaluation import result_files

pytestmark = pytest.mark.slow

RECIPE = os.path.join(REPO_ROOT, "docs", "tpu.md")
# The tiny preset, at a size a 2-core host trains in a minute.
TINY = [f"--config={REPO_ROOT}/configs/tiny.py", "--config.data.source=task",
        "--config.model.vocab_size=512",
        "--config.db.vocab_size=512", "--config.db.spm_train_bytes=300000",
        "--config.model.num_layers=2", "--config.model.cca_layers=(2,)",
        "--config.model.enc_num_layers=1", "--config.train.batch_size=16",
        "--config.train.seq_len=128", "--config.train.steps=4",
        "--config.train.warmup_steps=1", "--config.train.log_every=1",
        "--config.checkpoint.every=2", "--config.db.shard_chunks=512",
        "--config.db.recall_queries=50"]


def recipe_commands():
  """{script: the first command of docs/tpu.md that runs it}."""
  with open(RECIPE) as f:
    found = readme_commands(f.read())
  first = {}
  for cmd in found:
    first.setdefault(cmd.script, cmd)
  return first


def substituted(args, bucket, corpus):
  """The recipe's arguments with the three substitutions."""
  out = []
  for a in args:
    a = a.replace("gs://BUCKET", bucket)
    if a.startswith("--config="):
      continue                                  # The tiny preset instead.
    if a.startswith("--config.data.corpus="):
      a = f"--config.data.corpus={corpus}"
    if a.startswith("--config.train.accum_steps="):
      a = "--config.train.accum_steps=2"
    out.append(a)
  return TINY + out


@pytest.fixture(scope="module")
def gcs():
  emu = GcsEmulator().start()
  yield emu
  emu.stop()


def _pile_files(bucket):
  """Pile-layout .jsonl.zst files of standard-library text on the bucket."""
  docs = [d for d in sources.python_stdlib(order="shuffled")
          if 500 < len(d.text) < 4000][:160]
  for i in range(2):
    lines = "".join(json.dumps({"text": d.text, "meta": {
        "pile_set_name": "Github", "path": d.source}}) + "\n"
                    for d in docs[i::2])
    path = epath.Path(f"{bucket}/pile/train/{i:02d}.jsonl.zst")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
  return f"jsonl:{bucket}/pile/train/*.jsonl.zst"


def _run(args, cwd, env, timeout=900):
  out = subprocess.run([sys.executable] + args, cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=timeout)
  assert out.returncode == 0, (args[0], out.stdout[-3000:], out.stderr[-3000:])
  return out.stdout


def test_recipe_on_a_bucket(gcs, tmp_path):
  bucket = gcs.new_bucket("retro-recipe")
  corpus = _pile_files(bucket)
  cmds = recipe_commands()
  env = dict(os.environ, PYTHONPATH=REPO_ROOT,
             RETRO_JAX_STAGE_DIR=str(tmp_path / "stage"))
  cwd = tmp_path / "cwd"       # Where a stray local "gs:" folder would go.
  cwd.mkdir()
  script = lambda name: os.path.join(REPO_ROOT, name)

  for name in ("scripts/build_db.py", "scripts/cache_tasks.py"):
    _run([script(name)] + substituted(cmds[name].args, bucket, corpus),
         cwd, env)
  # The launcher's train flags (docs/tpu.md §3), run here as one process.
  launch = cmds["scripts/launch_tpu.sh"].args[3:]
  train_args = substituted(launch, bucket, corpus)
  _run([script("scripts/train.py")] + train_args, cwd, env)
  evaluate = substituted(cmds["scripts/evaluate.py"].args, bucket, corpus)
  evaluate = [f"--config={REPO_ROOT}/configs/eval.py:task", "--config.eval.max_batches=2"
              ] + [a for a in evaluate if a.startswith("--workdir")]
  _run([script("scripts/evaluate.py")] + evaluate, cwd, env)

  names = gcs.objects("retro-recipe")
  workdir = [a for a in train_args if a.startswith("--workdir=")][0]
  run = workdir.split("=", 1)[1][len(bucket) + 1:]
  assert "db/manifest.json" in names and "db/spm.model" in names
  assert any(n.startswith("cache/") and "tfrecord" in n for n in names)
  assert any(n.startswith(f"{run}/checkpoints/4/") for n in names), names
  assert any(n.startswith(f"{run}/") and "tfevents" in n for n in names)
  [results] = result_files.find(f"{bucket}/{run}", "task")
  assert results["step"] == 4
  bpb = results["sets"]["task"]["retrieval_on"]["bits_per_byte"]
  assert 0 < bpb < 20
  assert not any(p.name.startswith("gs:") for p in cwd.rglob("*"))
  assert not os.path.exists(os.path.join(REPO_ROOT, "gs:"))
