"""What identifies a RETRO Task's cached examples (retro_jax.data.task_spec),
and the run config fields that reach the cache job: no cache, no BERT."""

import os

from conftest import REPO_ROOT
from retro_jax.data import task_spec
from retro_jax.training import run_config


def test_spec_compares_only_the_splits_read_and_takes_old_records():
  """Pure comparison, no cache: a record of an earlier version (one
  max_bytes plus per-split overrides, the Task's splits, a relative DB path)
  serves the same text limits; only the limits of the splits read count."""
  new = {"corpus": "c", "db_dir": os.path.abspath("db"), "meta_filter": {},
         "max_bytes": {"train": 2_000, "validation": 200}}
  old = {"corpus": "c", "db_dir": "db", "meta_filter": {},
         "max_bytes": 2_000, "split_max_bytes": {"validation": 200},
         "splits": ["train", "validation"]}
  assert not task_spec.differences(new, old, ("train", "validation"))
  other = dict(new, max_bytes={"train": 2_000, "validation": 300})
  assert task_spec.differences(other, old, ("validation",)) == ["max_bytes"]
  assert not task_spec.differences(other, old, ("train",))
  assert task_spec.differences(dict(new, meta_filter={"a": "b"}), old,
                               ()) == ["meta_filter"]
  # 0 and an absent limit both mean all of the split.
  assert task_spec.split_limit({"max_bytes": {"train": 0}}, "train") is None
  assert task_spec.split_limit({"max_bytes": None}, "validation") is None


def test_run_config_cache_fields_reach_the_cache_job():
  """Every field of the run config's cache section, and the data fields of
  the Task, are read by scripts/cache_tasks.py or register_from_config."""
  config = run_config.base_config()
  code = "".join(open(os.path.join(REPO_ROOT, *p)).read() for p in (
      ("scripts", "cache_tasks.py"), ("retro_jax", "data", "tasks.py")))
  for field in config.cache:
    assert f"cache.{field}" in code, f"cache.{field} is never read"
  for field in ("task_name", "corpus", "max_bytes", "meta", "spm_path",
                "db_dir", "cache_dir"):
    assert f"data.{field}" in code, f"data.{field} is never read"
