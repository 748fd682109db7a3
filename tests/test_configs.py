"""The experiment configs: every one loads (directly and through
config_flags; tests/test_train_script.py loads one through scripts/train.py)
and describes a model that builds; each differs from configs/base.py only
where it means to; every base field is commented; the training loop requires
exactly the base fields.
"""

import ast
import glob
import io
import os
import tokenize

from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import pytest

from retro_jax import Retro, RetroConfig
from retro_jax.core import sharding
from retro_jax.training import loop
from retro_jax.training import run_config
from conftest import REPO_ROOT

CONFIGS = sorted(glob.glob(os.path.join(REPO_ROOT, "configs", "*.py")))
BASE = os.path.join(REPO_ROOT, "configs", "base.py")

# Experiment configs carry a `model` section; the others (e.g. evaluation's)
# are checked by the tests of the script that reads them.
MODEL_CONFIGS = [p for p in CONFIGS
                 if "model" in run_config.load_config_file(p)]

# What each config changes of configs/base.py ("model": any model field).
# A field changed by accident, or one added beside the base, fails here.
_SMALL_RUN = {"model", "train.batch_size", "train.seq_len", "train.steps",
              "train.total_steps", "train.learning_rate",
              "train.warmup_steps", "train.log_every", "checkpoint.every"}
INTENDED = {
    "base.py": set(),
    "tiny.py": _SMALL_RUN | {"data.task_name", "data.max_bytes.train",
                             "data.max_bytes.validation"},
    "quickstart.py": _SMALL_RUN | {
        "data.source", "data.task_name", "data.corpus",
        "data.max_bytes.train", "data.max_bytes.validation",
        "data.db_dir", "data.cache_dir", "db.vocab_size",
        "db.spm_train_bytes", "db.shard_chunks", "data.copy_share",
        "train.retrieval_lr_scale"},
    "retro.py": {"model", "data.source", "data.task_name", "data.corpus",
                 "mesh.data", "mesh.fsdp"},
    "bench.py": _SMALL_RUN - {"checkpoint.every"} | {
        "train.weight_decay", "train.b2", "train.clip_norm",
        "checkpoint.keep", "bench.warmup", "bench.steps"},
}


def _leaves(values, prefix=""):
  """{"section.field[.key]": value} of a config as plain data; the model
  section is one leaf."""
  out = {}
  for key, value in values.items():
    path = prefix + key
    if isinstance(value, dict) and path != "model":
      out.update(_leaves(value, path + "."))
    else:
      out[path] = value
  return out


def test_there_are_configs():
  names = {os.path.basename(p) for p in MODEL_CONFIGS}
  assert set(INTENDED) <= names, names


# base.py's network is the default RetroConfig (retro.py:172m without scan
# and bfloat16); tracing its 12 unrolled layers would take ~15 s.
@pytest.mark.parametrize("path", [p for p in MODEL_CONFIGS if p != BASE],
                         ids=os.path.basename)
def test_config_builds_abstract_model(path):
  config = run_config.load_config_file(path)
  cfg = RetroConfig.from_dict(config.model)
  model = Retro(cfg)
  batch, length = config.train.batch_size, config.train.seq_len
  tokens, neighbours = model.dummy_inputs(batch, length)
  params = jax.eval_shape(model.init, jax.random.key(0), tokens, neighbours)
  logits = jax.eval_shape(model.apply, params, tokens, neighbours)
  assert logits.shape == (batch, length, cfg.vocab_size)
  assert logits.dtype == jnp.float32
  assert len(sharding.mesh_shape(dict(config.mesh), 8)) == 3  # 8 devices.
  loop.check_config(config)   # Every field the training loop requires.


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=os.path.basename)
def test_config_loads_through_config_flags(path):
  # Overrides reach the nested sections, as `--config.model.x=...` does on a
  # script's command line. config_flags finds override flags in the argv it
  # is given (sys.argv by default).
  argv = ["prog", f"--config={path}", "--config.model.num_layers=3",
          "--config.model.cca_layers=(3,)",
          "--config.data.max_bytes.validation=5",
          "--config.data.meta={'pile_set_name': 'ArXiv'}"]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", path, "experiment config",
                                  flag_values=fv, sys_argv=argv)
  fv(argv)
  cfg = RetroConfig.from_dict(fv.config.model)
  assert cfg.num_layers == 3 and cfg.cca_layers == (3,)
  assert fv.config.data.max_bytes.validation == 5
  assert dict(fv.config.data.meta) == {"pile_set_name": "ArXiv"}
  want = run_config.load_config_file(path).to_dict()
  want["data"].update(max_bytes={**want["data"]["max_bytes"],
                                 "validation": 5},
                      meta={"pile_set_name": "ArXiv"})
  assert fv.config.to_dict() == {**want, "model": fv.config.model.to_dict()}


@pytest.mark.parametrize("name", sorted(INTENDED))
def test_config_differs_from_base_only_where_intended(name):
  base = _leaves(run_config.base_config().to_dict())
  config = _leaves(run_config.load_config_file(
      os.path.join(REPO_ROOT, "configs", name)).to_dict())
  missing = object()
  changed = {k for k in base.keys() | config.keys()
             if base.get(k, missing) != config.get(k, missing)}
  assert changed == INTENDED[name]


def test_total_steps_follows_steps_unless_set():
  config = run_config.load_config_file(
      os.path.join(REPO_ROOT, "configs", "tiny.py"))
  config.train.steps = 7
  assert config.train.total_steps == 7
  config.train.total_steps = 100     # Sets the horizon alone.
  assert (config.train.steps, config.train.total_steps) == (7, 100)


def _commented_lines(source):
  """Line numbers holding a comment, and those of comment-only lines."""
  comments, alone = set(), set()
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      comments.add(tok.start[0])
      if not tok.line[:tok.start[1]].strip():
        alone.add(tok.start[0])
  return comments, alone


def _assigned_fields(source):
  """{"section" or "section.field": (first line, last line)} of each
  `config.section[.field] = ...` statement."""
  out = {}
  for node in ast.walk(ast.parse(source)):
    if not isinstance(node, ast.Assign):
      continue
    for target in node.targets:
      names = []
      while isinstance(target, ast.Attribute):
        names.insert(0, target.attr)
        target = target.value
      if isinstance(target, ast.Name) and target.id == "config" and names:
        out[".".join(names)] = (node.lineno, node.end_lineno)
  return out


def test_every_base_field_has_a_comment():
  with open(BASE) as f:
    source = f.read()
  comments, alone = _commented_lines(source)
  assigned = _assigned_fields(source)

  def commented(field):
    first, last = assigned[field]
    # A comment on the statement's lines, or comment lines right above it.
    return bool(comments & set(range(first, last + 1))) or first - 1 in alone

  base = run_config.base_config()
  fields = ["model"] + [f"{section}.{field}" for section in base.keys()
                        if section != "model" for field in base[section]]
  assert not [f for f in fields if f not in assigned]
  assert not [f for f in fields if not commented(f)]


def test_training_requires_every_base_field():
  base = run_config.base_config()
  required = run_config.required_fields()
  assert set(required) == set(base.keys())
  for section in base.keys():
    if section != "model":
      assert set(required[section]) == set(base[section].keys()), section
  config = run_config.load_config_file(
      os.path.join(REPO_ROOT, "configs", "tiny.py"))
  del config.data.meta
  del config.cache
  with pytest.raises(ValueError, match=r"lacks config\.cache, "
                     r"config\.data\.meta \(configs/base\.py"):
    loop.check_config(config)
