"""Stage 2 end to end on digits: CLI outputs, resume equivalence, and the clear config errors."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from fedllava import config as config_lib
from fedllava import federate, rounds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import digits_lt  # noqa: E402  pylint: disable=g-import-not-at-top


def _tiny(rounds_=3, **over):
  c = digits_lt.get_config("tiny")
  c.fl.rounds = rounds_
  c.fl.clients_per_round = 4
  c.mesh.num_devices = 2
  for k, v in over.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


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
  for name in (
    "confusion.png",
    "accuracy.png",
    "report.json",
    "metrics.jsonl",
    "metrics.csv",
    "client_histogram.csv",
    "config.json",
  ):
    assert (wd / name).exists(), name
  assert (wd / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert os.listdir(wd / "tb")
  rows = [json.loads(s) for s in (wd / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2]
  report = json.loads((wd / "report.json").read_text())
  assert len(report["per_class"]) == 10 and 0 <= report["top1"] <= 100
  hist = np.loadtxt(wd / "client_histogram.csv", delimiter=",", skiprows=1)
  assert hist.shape[0] == 20


@pytest.fixture
def x64():
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", False)


def test_killed_run_resumes_to_the_same_parameters(tmp_path, monkeypatch, x64):
  cfg = _tiny(3, **{"model.dtype": "float64"})
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
  for x, y in zip(jax.tree.leaves(straight["variables"]), jax.tree.leaves(resumed["variables"])):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-12, rtol=0)
  hist = [
    json.loads(s)["step"] for s in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
  ]
  assert hist == [1, 2, 3]
  assert straight["report"]["top1"] == resumed["report"]["top1"]


def test_host_placement_equals_device_placement_and_resume_guard(tmp_path):
  """ImageNet-LT's ``placement=host`` (gather on the host each round) computes the same run."""
  dev = federate.run(_tiny(1), str(tmp_path / "dev"))
  host = federate.run(_tiny(1, **{"data.placement": "host"}), str(tmp_path / "host"))
  for x, y in zip(jax.tree.leaves(dev["variables"]), jax.tree.leaves(host["variables"])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  with pytest.raises(ValueError, match="imbalance_factor"):
    federate.run(_tiny(1, **{"data.imbalance_factor": 50.0}), str(tmp_path / "dev"))
  assert (
    json.loads((tmp_path / "dev" / "config.json").read_text())["data"]["imbalance_factor"] == 10
  )


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
  ],
)
def test_bad_config_gives_a_clear_error(override, message, tmp_path):
  cfg = _tiny(1, **override)
  with pytest.raises(ValueError, match=message):
    config_lib.validate(cfg)
  assert not os.path.exists(tmp_path / "x")


def test_missing_imagenet_manual_dir_names_the_directory(tmp_path):
  sys.path.insert(0, os.path.join(ROOT, "configs"))
  import imagenet_lt  # pylint: disable=g-import-not-at-top

  cfg = imagenet_lt.get_config()
  cfg.data.manual_dir = str(tmp_path / "nowhere")
  with pytest.raises(ValueError, match="nowhere.*ILSVRC2012_img_train.tar"):
    config_lib.validate(cfg)


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
    config_lib.validate(cfg)
  c = importlib.import_module("cifar10_lt").get_config("if=50,algo=fedprox")
  assert c.data.imbalance_factor == 50 and c.fl.algorithm == "fedprox"
  assert c.fl.clients_per_round == 8 and c.fl.num_clients == 20 and c.fl.batch_size == 32
  with pytest.raises(ValueError, match="unknown config variant"):
    importlib.import_module("cifar10_lt").get_config("imb=50")


def test_cifar10_lt_config_builds_clients_through_tfds_mock():
  """The real CIFAR path (TFDS data_source) end to end up to the padded client store."""
  tfds = pytest.importorskip("tensorflow_datasets")
  import importlib  # pylint: disable=g-import-not-at-top

  from fedllava.data import federated  # pylint: disable=g-import-not-at-top

  cfg = importlib.import_module("cifar10_lt").get_config("if=10")
  cfg.fl.num_clients = 2
  cfg.fl.clients_per_round = 1
  config_lib.validate(cfg)
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
  assert "config.data.imbalance_factor=0.5 must be >= 1" in out.stderr
  assert "Traceback" not in out.stderr
  assert not wd.exists()
