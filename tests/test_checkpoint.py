"""Checkpoints: damaged steps are set aside (not fatal), states are checksummed, non-finite
states and failed writes never cost the last good checkpoint, and the config guard."""

import errno
import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fedllava import checkpoint

# A failed restore or save leaves some of orbax's parallel reads/writes to be garbage-collected
# unawaited; that is orbax's internal noise, not a result of the test.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _state(step: int):
  k = jax.random.fold_in(jax.random.PRNGKey(0), step)
  return {
    "params": {
      "dense": {"kernel": jax.random.normal(k, (32, 64)), "bias": jnp.full((64,), float(step))},
    },
    "batch_stats": {"bn": {"mean": jnp.arange(8.0) + step, "var": jnp.ones((8,))}},
    "count": jnp.int32(step),
  }


def _like():
  return jax.tree.map(jnp.zeros_like, _state(0))


def _equal(a, b) -> bool:
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b)))


def _saved(tmp_path, steps=(1, 2, 3), keep=5):
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), every=1, keep=keep)
  for s in steps:
    assert ckpt.save(s, _state(s), {"best_top1": 0.1 * s, "best_round": s})
  ckpt.close()
  return str(tmp_path / "checkpoints")


def _files(step_dir: str) -> list[str]:
  return sorted(os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs)


def _array_files(step_dir: str) -> list[str]:
  return [f for f in _files(step_dir) if f"{os.sep}d{os.sep}" in f]


def _flip_bit(step_dir):
  big = max(_array_files(step_dir), key=os.path.getsize)  # the 32x64 kernel's chunk
  data = bytearray(open(big, "rb").read())
  data[len(data) // 2] ^= 0x01
  open(big, "wb").write(bytes(data))


def _truncate(step_dir):
  big = max(_array_files(step_dir), key=os.path.getsize)
  os.truncate(big, os.path.getsize(big) // 2)


def _delete_arrays(step_dir):
  for f in _array_files(step_dir):
    os.remove(f)


def _garbage_metadata(step_dir):
  hit = [f for f in _files(step_dir) if os.path.basename(f) == "_METADATA"]
  assert hit
  for f in hit:
    open(f, "wb").write(b"\xff\xfe\x00 not json")


DAMAGE = {
  "flipped_bit": _flip_bit,
  "truncated": _truncate,
  "deleted_arrays": _delete_arrays,
  "garbage_metadata": _garbage_metadata,
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_latest_is_set_aside_and_previous_restored(tmp_path, damage):
  directory = _saved(tmp_path)
  DAMAGE[damage](os.path.join(directory, "3"))
  ckpt = checkpoint.Checkpointer(directory, every=1, keep=5)
  step, state, meta, messages = ckpt.restore_latest(_like())
  assert step == 2
  assert _equal(state, _state(2))
  assert meta == {"best_top1": 0.2, "best_round": 2}
  assert len(messages) == 1 and "\n" not in messages[0]
  assert "round 3 is damaged" in messages[0] and "resuming from round 2" in messages[0]
  # Set aside, not deleted; orbax no longer sees it, and saving continues.
  assert not os.path.exists(os.path.join(directory, "3"))
  (moved,) = os.listdir(os.path.join(directory, checkpoint.DAMAGED_DIR))
  assert moved.startswith("3-") and moved in messages[0]
  assert _files(os.path.join(directory, checkpoint.DAMAGED_DIR, moved))
  assert ckpt.latest_round() == 2
  assert ckpt.save(3, _state(3), {})
  ckpt.close()
  again = checkpoint.Checkpointer(directory, every=1, keep=5)
  step, state, _, messages = again.restore_latest(_like())
  assert (step, messages) == (3, []) and _equal(state, _state(3))
  again.close()


def test_empty_stray_step_dir_and_all_damaged_start_from_scratch(tmp_path):
  directory = _saved(tmp_path, steps=(1,))
  os.makedirs(os.path.join(directory, "9"))
  _delete_arrays(os.path.join(directory, "1"))
  ckpt = checkpoint.Checkpointer(directory, every=1, keep=5)
  like = _like()
  step, state, meta, messages = ckpt.restore_latest(like)
  assert (step, meta) == (0, {}) and state is like
  assert len(messages) == 2
  assert "round 9 is damaged" in messages[0] and "resuming from round 1" in messages[0]
  assert "round 1 is damaged" in messages[1] and "starting from scratch" in messages[1]
  assert sorted(n.split("-")[0] for n in os.listdir(os.path.join(directory, "damaged"))) == [
    "1",
    "9",
  ]
  assert ckpt.latest_round() is None
  ckpt.close()


def test_restore_of_other_shapes_is_refused_not_set_aside(tmp_path):
  directory = _saved(tmp_path, steps=(1,))
  ckpt = checkpoint.Checkpointer(directory, every=1, keep=5)
  like = _like()
  like["params"]["dense"]["kernel"] = jnp.zeros((32, 65))
  with pytest.raises(checkpoint.CheckpointError, match="another shape.*params.dense.kernel"):
    ckpt.restore_latest(like)
  assert os.path.isdir(os.path.join(directory, "1"))
  ckpt.close()


def test_restore_keeps_sharding_of_like(tmp_path):
  directory = _saved(tmp_path, steps=(1,))
  mesh = jax.make_mesh((len(jax.devices()),), ("clients",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  like = jax.device_put(_like(), sharding)
  ckpt = checkpoint.Checkpointer(directory, every=1, keep=5)
  step, state, _, _ = ckpt.restore_latest(like)
  assert step == 1 and _equal(state, _state(1))
  assert state["params"]["dense"]["kernel"].sharding == sharding
  ckpt.close()


def test_non_finite_state_is_never_saved(tmp_path):
  directory = str(tmp_path / "checkpoints")
  ckpt = checkpoint.Checkpointer(directory, every=1, keep=1)
  assert ckpt.save(1, _state(1), {})
  bad = _state(2)
  bad["batch_stats"]["bn"]["var"] = bad["batch_stats"]["bn"]["var"].at[3].set(jnp.nan)
  with pytest.raises(FloatingPointError, match=r"round 2: \['batch_stats'\]\['bn'\]\['var'\]"):
    ckpt.save(2, bad, {})
  inf = _state(3)
  inf["params"]["dense"]["bias"] = (
    inf["params"]["dense"]["bias"].astype(jnp.bfloat16).at[0].set(jnp.inf)
  )
  with pytest.raises(FloatingPointError, match="round 3"):
    ckpt.save(3, inf, {}, force=True)
  assert ckpt.latest_round() == 1  # keep=1: a written NaN state would have pushed 1 out
  step, state, _, messages = ckpt.restore_latest(_like())
  assert (step, messages) == (1, []) and _equal(state, _state(1))
  ckpt.close()


@pytest.mark.parametrize(
  "error",
  [
    OSError(errno.ENOSPC, "No space left on device"),
    ValueError("Error writing local file: No space left on device [os_error_code='28']"),
  ],
)
def test_failed_write_is_one_clear_error_and_keeps_last(tmp_path, monkeypatch, error):
  import orbax.checkpoint as ocp

  directory = str(tmp_path / "checkpoints")
  ckpt = checkpoint.Checkpointer(directory, every=1, keep=1)
  assert ckpt.save(1, _state(1), {"r": 1})

  async def disk_full(self, directory, *args, **kwargs):
    raise error

  # Fails inside orbax's save, after its temporary step directory has been created. (Failing a
  # later item instead leaves orbax's array writes running in the background, racing the cleanup.)
  monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", disk_full)
  with pytest.raises(checkpoint.CheckpointError) as info:
    ckpt.save(2, _state(2), {"r": 2})
  assert str(info.value).startswith("could not save round 2 (")
  assert "No space left on device" in str(info.value)
  assert "the last checkpoint, round 1, is intact" in str(info.value)
  assert isinstance(info.value, RuntimeError)
  assert os.listdir(directory) == ["1"]  # the unfinished step-2 directory is gone
  monkeypatch.undo()
  ckpt.close()
  ckpt = checkpoint.Checkpointer(directory, every=1, keep=1)
  step, state, meta, messages = ckpt.restore_latest(_like())
  assert (step, meta, messages) == (1, {"r": 1}, []) and _equal(state, _state(1))
  assert ckpt.save(2, _state(2), {"r": 2})  # the failed save left nothing in the way
  ckpt.close()


def test_other_save_errors_are_not_disguised(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path / "c"), every=1, keep=1)
  with pytest.raises(ValueError, match="reserved"):
    ckpt.save(1, _state(1), {"_integrity": 1})
  ckpt.close()


def test_save_interval_and_latest_saved_round(tmp_path):
  directory = str(tmp_path / "checkpoints")
  assert checkpoint.latest_saved_round(directory) is None
  assert not os.path.exists(directory)
  ckpt = checkpoint.Checkpointer(directory, every=5, keep=2)
  assert ckpt.save(5, _state(5), {})
  assert not ckpt.save(7, _state(7), {})
  assert ckpt.save(7, _state(7), {}, force=True)
  assert checkpoint.latest_saved_round(directory) == 7
  ckpt.close()


# --- config guard ------------------------------------------------------------------------------


def _config(**overrides):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.fl = ml_collections.ConfigDict({"rounds": 10, "learning_rate": 0.1, "mu": float("nan")})
  c.checkpoint = ml_collections.ConfigDict({"every": 5, "keep": 2})
  for k, v in overrides.items():
    section, field = k.split("__")
    c[section][field] = v
  return c


def test_config_guard_nan_and_no_progress(tmp_path):
  workdir = str(tmp_path)
  assert checkpoint.check_config(workdir, _config(), has_progress=False) == []
  assert not os.path.exists(tmp_path / "config.json")  # nothing written before the run starts
  checkpoint.write_config(workdir, _config())
  assert math.isnan(json.loads((tmp_path / "config.json").read_text())["fl"]["mu"])
  # The same command (with a NaN field) is the same run.
  assert checkpoint.check_config(workdir, _config(), has_progress=True) == []
  # No completed round: a different config simply replaces it.
  assert checkpoint.check_config(workdir, _config(fl__learning_rate=0.5), has_progress=False) == []
  checkpoint.write_config(workdir, _config(fl__learning_rate=0.5))
  assert json.loads((tmp_path / "config.json").read_text())["fl"]["learning_rate"] == 0.5


def test_config_changes_are_logged_never_refused(tmp_path):
  """Which stages a changed field reruns is decided per stage (test_provenance.py); here every
  changed field, science or not, is returned and logged with its old and new value."""
  workdir = str(tmp_path)
  checkpoint.write_config(workdir, _config())
  new = _config(fl__rounds=20, checkpoint__every=2, fl__learning_rate=0.5)
  changed = checkpoint.check_config(workdir, new, has_progress=True)
  assert changed == ["checkpoint.every", "fl.learning_rate", "fl.rounds"]
  checkpoint.write_config(workdir, new, resumed_changes=changed)
  assert json.loads((tmp_path / "config.json").read_text())["fl"]["rounds"] == 20
  log = json.loads((tmp_path / "resume_log.json").read_text())["resumed"]
  assert len(log) == 1
  assert log[0]["changed"] == {
    "checkpoint.every": [5, 2],
    "fl.learning_rate": [0.1, 0.5],
    "fl.rounds": [10, 20],
  }
  assert "time" in log[0]
  assert checkpoint.check_config(workdir, new, has_progress=True) == []
  assert not [n for n in os.listdir(workdir) if n.startswith(".tmp-")]
