"""Stage 2 end to end on digits: CLI outputs, resume equivalence, and the clear config errors."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import prepared_tfds, tiny_digits

from fedllava import federate, main
from fedllava.federate import rounds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))


_tiny = tiny_digits


def test_cli_runs_and_writes_outputs(tmp_path):
  wd = tmp_path / "run"
  env = dict(os.environ, PYTHONPATH=ROOT)
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "fedllava.main",
      "--config=configs/digits_lt.py:tiny",
      f"--workdir={wd}",
      "--config.fl.rounds=2",
      "--config.fl.algorithm=fedprox",
      "--config.data.partition=dirichlet",
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  text = out.stdout + out.stderr
  for word in ("top-1", "many", "medium", "few", "fedprox", "uploads"):
    assert word in text
  assert "+ alignment" in text  # the side-by-side table
  for name in ("config.json", "report.json", "report.txt", "confusion_comparison.png"):
    assert (wd / name).exists(), name
  fed = wd / "federate"
  for name in (
    "confusion.png",
    "accuracy.png",
    "report.json",
    "metrics.jsonl",
    "metrics.csv",
    "client_histogram.csv",
  ):
    assert (fed / name).exists(), name
  assert (fed / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert os.listdir(fed / "tb")
  rows = [json.loads(s) for s in (fed / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2]
  report = json.loads((fed / "report.json").read_text())["final"]
  assert len(report["per_class"]) == 10 and 0 <= report["top1"] <= 100
  assert (wd / "align" / "report.json").exists()
  hist = np.loadtxt(fed / "client_histogram.csv", delimiter=",", skiprows=1)
  assert hist.shape[0] == 20


def _final_server_state(cfg, workdir):
  """The server state (optax state and the method's own) of ``workdir``'s last checkpoint."""
  from fedllava import algorithms, checkpoint
  from fedllava.models import resnet

  like = resnet.create_model(cfg.model, 10).init(
    jax.random.PRNGKey(0), np.zeros((1, 8, 8, 3), np.float32)
  )
  like = jax.tree.map(lambda x: x.astype(np.float64), like)
  server = algorithms.base.init_server_state(
    algorithms.create(cfg.fl), like, 10, jax.random.PRNGKey(0)
  )
  ck = checkpoint.Checkpointer(str(workdir / "checkpoints"), 1, 2)
  try:
    return ck.restore_latest({"variables": like, "server_state": server})[1]["server_state"]
  finally:
    ck.close()


# DP: the noise comes from the round's server key and the adaptive clip is checkpointed state,
# so a killed DP run resumes to the same parameters too (a per-run key or an unsaved clip fails).
DP_RUN = {
  "fl.dp.enabled": True,
  "fl.dp.adaptive_clip": True,
  "fl.dp.noise_multiplier": 0.5,
  "fl.dp.clipped_count_stddev": 1.0,
}


@pytest.mark.parametrize(
  "algorithm, extra",
  [("fedavg", {}), ("ccvr", {"fl.ccvr.num_virtual": 8}), ("feddf", {}), ("fedavg", DP_RUN)],
  ids=["fedavg", "ccvr", "feddf", "dp"],
)
def test_killed_run_resumes_to_the_same_parameters(tmp_path, monkeypatch, x64, algorithm, extra):
  """A run killed after round 2 resumes to the straight run's parameters and server state;
  ``ccvr`` has client uploads and a method state, ``feddf`` a server step on server data whose
  batches come from the round's server key (not checkpointed), ``dp`` noise from that key and an
  adaptive clip in the method state."""
  cfg = _tiny(3, **{"model.dtype": "float64", "fl.algorithm": algorithm, **extra})
  straight = federate.run(cfg, str(tmp_path / "a"))

  real = rounds.sample_clients

  def crash_at_round_2(seed, r, *a):
    if r == 2:
      raise KeyboardInterrupt("simulated kill")
    return real(seed, r, *a)

  monkeypatch.setattr(rounds, "sample_clients", crash_at_round_2)
  with pytest.raises(KeyboardInterrupt):
    federate.run(cfg, str(tmp_path / "b"))
  monkeypatch.setattr(rounds, "sample_clients", real)
  assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["1", "2"]
  resumed = federate.run(cfg, str(tmp_path / "b"))
  for x, y in zip(jax.tree.leaves(straight.variables), jax.tree.leaves(resumed.variables)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # bit-identical
  hist = [
    json.loads(s)["step"] for s in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
  ]
  assert hist == [1, 2, 3]
  assert straight.report["final"]["top1"] == resumed.report["final"]["top1"]
  a = _final_server_state(cfg, tmp_path / "a")
  b = _final_server_state(cfg, tmp_path / "b")
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  if "fl.dp.enabled" in extra:
    rows = [json.loads(s) for s in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert all("dp/epsilon" in r and "dp/clip" in r for r in rows)
    assert resumed.report["dp"]["rounds_run"] == 3


def test_host_placement_equals_device_placement_and_resume_guard(tmp_path):
  """ImageNet-LT's ``placement=host`` (gather on the host each round) computes the same run."""
  only_fed = {"stages": "federate"}
  dev = main.run(_tiny(1, **only_fed), str(tmp_path / "dev"))["federate"]
  host = main.run(_tiny(1, **only_fed, **{"data.placement": "host"}), str(tmp_path / "host"))
  for x, y in zip(jax.tree.leaves(dev.variables), jax.tree.leaves(host["federate"].variables)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # Where the data lives is not part of stage 2's key: the complete stage is loaded, not rerun.
  files = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "dev" / "federate").iterdir()}
  again = main.run(_tiny(1, **only_fed, **{"data.placement": "host"}), str(tmp_path / "dev"))
  assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "dev" / "federate").iterdir()} == files
  for x, y in zip(jax.tree.leaves(dev.variables), jax.tree.leaves(again["federate"].variables)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize(
  "override, message",
  [
    ({"data.imbalance_factor": 0.5}, "imbalance_factor"),
    ({"fl.clients_per_round": 30}, "clients_per_round"),
    ({"data.name": "mnist"}, "data.name"),
    ({"fl.algorithm": "scaffold"}, "fl.algorithm"),
    ({"fl.client_parallelism": "pmap"}, "client_parallelism"),
    ({"stages": "federate,distill"}, "stages"),
    ({"model.name": "vgg11"}, "model.name"),
    ({"model.conv_impl": "winograd"}, "conv_impl"),
    ({"model.bn_impl": "welford"}, "bn_impl"),
    ({"eval.every": 0}, "eval.every"),
    ({"eval.batch_size": 0}, "eval.batch_size"),
    ({"fl.group_size": -1}, "fl.group_size"),
    ({"fl.client_parallelism": "group", "fl.group_size": 3}, "group_size=3 must divide"),
    ({"mesh.num_devices": -1}, "mesh.num_devices"),
    ({"data.crop_padding": -1}, "crop_padding"),
    ({"fl.learning_rate": 0.0}, "fl.learning_rate"),
    ({"fl.learning_rate": -0.1}, "fl.learning_rate"),
    ({"model.width": 0}, "model.width"),
    ({"seed": -1}, "config.seed"),
    ({"data.dirichlet_alpha": float("nan")}, "dirichlet_alpha=nan"),
  ],
)
def test_bad_config_gives_a_clear_error(override, message, tmp_path):
  cfg = _tiny(1, **override)
  with pytest.raises(ValueError, match=message):
    main.validate(cfg)
  assert not os.path.exists(tmp_path / "x")


def test_missing_imagenet_manual_dir_names_the_directory(tmp_path):
  sys.path.insert(0, os.path.join(ROOT, "configs"))
  import imagenet_lt  # pylint: disable=g-import-not-at-top

  cfg = imagenet_lt.get_config()
  cfg.data.manual_dir = str(tmp_path / "nowhere")
  with pytest.raises(ValueError, match="nowhere.*ILSVRC2012_img_train.tar"):
    main.validate(cfg)


def test_a_client_with_no_data_is_an_error(tmp_path):
  cfg = _tiny(1, **{"fl.num_clients": 1000, "fl.clients_per_round": 8})
  with pytest.raises(ValueError, match="client|worker|group"):
    federate.run(cfg, str(tmp_path))


def test_every_config_loads_and_validates(monkeypatch, tmp_path):
  import importlib  # pylint: disable=g-import-not-at-top

  manual = tmp_path / "manual"
  manual.mkdir()
  for name in ("digits_lt", "cifar10_lt", "cifar100_lt", "imagenet_lt"):
    mod = importlib.import_module(name)
    cfg = mod.get_config()
    if name == "imagenet_lt":
      cfg.data.manual_dir = str(manual)
    if name.startswith("cifar"):  # offline: a prepared copy (sources.check_available)
      cfg.data.data_dir = prepared_tfds(tmp_path / "tfds", cfg.data.name)
    if cfg.align.teacher:  # offline: a local directory stands for the cached hub copy
      cfg.align.teacher = str(manual)
    main.validate(cfg)
  c = importlib.import_module("cifar10_lt").get_config("if=50,algo=fedprox")
  assert c.data.imbalance_factor == 50 and c.fl.algorithm == "fedprox"
  assert c.fl.clients_per_round == 8 and c.fl.num_clients == 20 and c.fl.batch_size == 32
  with pytest.raises(ValueError, match="unknown config variant"):
    importlib.import_module("cifar10_lt").get_config("imb=50")


def test_cifar10_lt_config_builds_clients_through_tfds_mock(tmp_path):
  """The real CIFAR path (TFDS data_source) end to end up to the padded client store."""
  tfds = pytest.importorskip("tensorflow_datasets")
  import importlib  # pylint: disable=g-import-not-at-top

  from fedllava.data import federated  # pylint: disable=g-import-not-at-top

  cfg = importlib.import_module("cifar10_lt").get_config("if=10")
  cfg.fl.num_clients = 2
  cfg.fl.clients_per_round = 1
  cfg.data.data_dir = prepared_tfds(tmp_path, "cifar10")
  cfg.align.teacher = str(tmp_path)  # offline: a local directory stands for the hub copy
  main.validate(cfg)
  with tfds.testing.mock_data(num_examples=300):
    data = federated.build(cfg)
  assert data.images.shape[0] == 2 and data.images.shape[2:] == (32, 32, 3)
  assert data.sizes.sum() == len(data.train) == data.class_counts.sum()
  assert abs(int(data.sizes[0]) - int(data.sizes[1])) <= 1
  assert data.norm.mean == (0.4914, 0.4822, 0.4465)


def test_cli_bad_config_exits_with_the_message_and_writes_nothing(tmp_path):
  wd = tmp_path / "run"
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "fedllava.main",
      "--config=configs/digits_lt.py:if=0.5",
      f"--workdir={wd}",
    ],
    cwd=ROOT,
    env=dict(os.environ, PYTHONPATH=ROOT),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode != 0
  assert "config.data.imbalance_factor=0.5 must be a number >= 1" in out.stderr
  assert "Traceback" not in out.stderr
  assert not wd.exists()


# ---- reliability (each failed on the code before the fix) ----
def test_divergence_stops_names_the_round_and_keeps_the_last_finite_checkpoint(tmp_path):
  from fedllava import checkpoint

  cfg = _tiny(4, stages="federate", **{"fl.server_lr": 1e15, "checkpoint.every": 1})
  with pytest.raises(FloatingPointError, match=r"round \d.*non-finite.*learning_rate") as e:
    main.run(cfg, str(tmp_path))
  bad_round = int(str(e.value).split("round ")[1].split(":")[0])
  ckpt_dir = tmp_path / "federate" / "checkpoints"
  kept = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  assert all(r < bad_round for r in kept)
  if kept:  # every kept state is finite and restores
    from fedllava import algorithms
    from fedllava.models import resnet

    ck = checkpoint.Checkpointer(str(ckpt_dir), 1, 2)
    like = resnet.create_model(cfg.model, 10).init(
      jax.random.PRNGKey(0), np.zeros((1, 8, 8, 3), np.float32)
    )
    server = algorithms.create(cfg.fl).server_optimizer.init(like["params"])
    step, state, _, _ = ck.restore_latest({"variables": like, "server_state": server})
    ck.close()
    assert step == kept[-1]
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state))


def test_nan_learning_rate_is_a_config_error():
  with pytest.raises(ValueError, match="fl.learning_rate=nan"):
    main.validate(_tiny(1, **{"fl.learning_rate": float("nan")}))


def test_a_late_data_error_leaves_no_config_and_the_fixed_command_runs(tmp_path):
  with pytest.raises(ValueError, match="client"):
    main.run(_tiny(1, stages="federate", **{"fl.num_clients": 500}), str(tmp_path))
  assert not (tmp_path / "config.json").exists()
  main.run(_tiny(1, stages="federate"), str(tmp_path))  # not refused as "another run"
  assert (tmp_path / "config.json").exists()


def test_resuming_a_longer_finished_run_with_fewer_rounds_is_refused(tmp_path):
  main.run(_tiny(2, stages="federate"), str(tmp_path))
  with pytest.raises(ValueError, match="finished at round 2.*fl.rounds=1"):
    main.run(_tiny(1, stages="federate"), str(tmp_path))


def test_damaged_latest_checkpoint_falls_back_and_ends_like_an_uninterrupted_run(tmp_path, capsys):
  cfg = _tiny(3, stages="federate", **{"checkpoint.every": 1, "checkpoint.keep": 3})
  straight = main.run(cfg, str(tmp_path / "a"))["federate"]
  short = _tiny(2, stages="federate", **{"checkpoint.every": 1, "checkpoint.keep": 3})
  main.run(short, str(tmp_path / "b"))
  step2 = tmp_path / "b" / "federate" / "checkpoints" / "2"
  data_dir = step2 / "state" / "ocdbt.process_0" / "d"
  data_files = sorted((str(data_dir / f) for f in os.listdir(data_dir)), key=os.path.getsize)
  with open(data_files[-1], "r+b") as f:  # flip one bit of the largest array file
    f.seek(os.path.getsize(data_files[-1]) // 2)
    b = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([b[0] ^ 1]))
  resumed = main.run(cfg, str(tmp_path / "b"))["federate"]
  out = capsys.readouterr().out
  assert "round 2 is damaged" in out
  assert os.listdir(tmp_path / "b" / "federate" / "checkpoints" / "damaged")
  for x, y in zip(jax.tree.leaves(straight.variables), jax.tree.leaves(resumed.variables)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_second_run_in_the_same_workdir_is_refused(tmp_path):
  from fedllava import fileio

  sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    (tmp_path / ".lock").write_text(
      json.dumps({"pid": sleeper.pid, "host": __import__("socket").gethostname(), "started": "x"})
    )
    with pytest.raises(fileio.WorkdirLockedError, match="in use by pid"):
      main.run(_tiny(1, stages="federate"), str(tmp_path))
    assert not (tmp_path / "federate").exists()
  finally:
    sleeper.kill()


def test_torn_metrics_line_and_stale_temporaries_are_repaired_on_resume(tmp_path):
  main.run(_tiny(2, stages="federate"), str(tmp_path))
  jsonl = tmp_path / "federate" / "metrics.jsonl"
  text = jsonl.read_text()
  jsonl.write_text(text[: text.rindex("{") + 10])  # round 2's line torn mid-write
  (tmp_path / "federate" / ".tmp-fedllava-stale").write_text("")
  main.run(_tiny(3, stages="federate"), str(tmp_path))
  steps = [json.loads(s)["step"] for s in jsonl.read_text().splitlines()]
  assert steps == [1, 2, 3]
  assert not (tmp_path / "federate" / ".tmp-fedllava-stale").exists()
  log = json.loads((tmp_path / "resume_log.json").read_text())
  assert "fl.rounds" in log["resumed"][-1]["changed"]


def test_cli_user_errors_are_one_message_without_a_traceback(tmp_path):
  def cli(*args):
    return subprocess.run(
      [sys.executable, "-m", "fedllava.main", *args],
      cwd=ROOT,
      env=dict(os.environ, PYTHONPATH=ROOT),
      capture_output=True,
      text=True,
      timeout=300,
    )

  missing = cli("--config=configs/nope.py", f"--workdir={tmp_path / 'a'}")
  assert missing.returncode != 0 and "cannot load --config" in missing.stderr
  assert "Traceback" not in missing.stderr and "nope.py" in missing.stderr
  (tmp_path / "b").mkdir()
  (tmp_path / "b" / ".lock").write_text(
    json.dumps({"pid": os.getpid(), "host": __import__("socket").gethostname(), "started": "now"})
  )
  locked = cli("--config=configs/digits_lt.py:tiny", f"--workdir={tmp_path / 'b'}")
  assert locked.returncode != 0 and "is in use by pid" in locked.stderr
  assert "Traceback" not in locked.stderr and len(locked.stderr.strip().splitlines()) <= 3
