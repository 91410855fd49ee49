"""The config schema shared by ``configs/*.py``, variant parsing and up-front validation.

Every number of a run lives in the config, grouped by stage (``data``, ``model``, ``fl``,
``eval``, ``checkpoint``, ``mesh``); ``configs/X.py:if=50,algo=fedprox`` picks variants
(big_vision's ``parse_arg``) and ``--config.fl.rounds=5`` overrides single fields.
"""

from __future__ import annotations

import os

import ml_collections

from fedllava import algorithms, rounds
from fedllava.models import resnet

DATASETS = ("cifar10", "cifar100", "imagenet_lt", "digits", "synthetic")
PARTITIONS = ("creff", "dirichlet")
STAGES = ("federate",)


def parse_arg(arg: str | None, **defaults):
  """Parses ``"if=50,algo=fedprox,runlocal"`` into a ConfigDict over ``defaults``.

  A bare word sets a boolean flag to True; values are converted to the type of the default.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config variant {key!r}; known: {sorted(defaults)}.")
    if not sep:
      out[key] = True
    elif isinstance(defaults[key], bool):
      out[key] = value.lower() in ("1", "true", "yes")
    elif defaults[key] is None:
      out[key] = value
    else:
      out[key] = type(defaults[key])(value)
  return out


def base_config() -> ml_collections.ConfigDict:
  """Defaults: the paper's CIFAR-10-LT FedAvg setting (Sec. 4.1), following CReFF's code."""
  c = ml_collections.ConfigDict()
  c.name = "run"  # default workdir: workdirs/<name>
  c.seed = 7  # one seed: long tail, partition, sampling, init, augmentation
  c.stages = "federate"
  c.workdir = ""  # set by --workdir

  c.data = ml_collections.ConfigDict()
  c.data.name = "cifar10"
  c.data.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.data.manual_dir = ml_collections.FieldReference(None, field_type=str)
  c.data.image_size = ml_collections.FieldReference(None, field_type=int)  # imagenet_lt only
  c.data.imbalance_factor = 100.0
  c.data.longtail_seed = ml_collections.FieldReference(None, field_type=int)  # None: c.seed
  c.data.partition = "creff"  # or "dirichlet" (Hsu et al. 2019, unequal sizes)
  c.data.dirichlet_alpha = 0.5
  c.data.align_per_class = 0  # images per class held out for stage 3's D_align
  c.data.crop_padding = 4
  c.data.flip = True
  c.data.per_batch_augment = False  # True reproduces CReFF (one crop/flip per batch)
  c.data.placement = "device"  # client data on device for the run, or "host" per round
  c.data.synthetic_examples = 1000

  c.model = ml_collections.ConfigDict()
  c.model.name = "resnet8"
  c.model.width = 64  # CReFF ResNet_cifar(resnet_size=8, scaling=4)
  c.model.mlp_dim = ml_collections.FieldReference(None, field_type=int)  # CLIP width
  c.model.head_on_mlp = False
  c.model.dtype = "float32"
  # "xla" (nn.Conv) or "im2col" (same parameters and results, patches x kernel); "auto" picks
  # what benchmarks/round_speed.py measured faster: im2col on CPU (7.8x on 2 cores), xla on
  # an H200 (vmapped grouped convolutions 5.1 s/round vs 8.7 s/round with im2col).
  c.model.conv_impl = "auto"

  c.fl = ml_collections.ConfigDict()
  c.fl.algorithm = "fedavg"
  c.fl.num_clients = 20
  c.fl.clients_per_round = 8  # 40% of 20
  c.fl.rounds = 200
  c.fl.local_epochs = 10
  c.fl.batch_size = 32
  c.fl.learning_rate = 0.1
  c.fl.server_lr = 1.0
  c.fl.prox_mu = 0.01
  c.fl.server_momentum = 0.9
  c.fl.client_parallelism = "vmap"  # vmap | map | group
  c.fl.group_size = 1

  c.eval = ml_collections.ConfigDict()
  c.eval.every = 1
  c.eval.batch_size = 500

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 10
  c.checkpoint.keep = 2

  c.mesh = ml_collections.ConfigDict()
  c.mesh.num_devices = 0  # 0: all visible devices
  return c


def cifar_lt_config(dataset: str, arg: str | None) -> ml_collections.ConfigDict:
  """The paper's CIFAR-10/100-LT setting with variants ``if=``, ``algo=``, ``rounds=``."""
  a = parse_arg(arg, **{"if": 100.0, "algo": "fedavg", "rounds": 200})
  c = base_config()
  c.name = f"{dataset}_lt_if{a['if']:g}_{a.algo}"
  c.data.name = dataset
  c.data.imbalance_factor = a["if"]
  c.fl.algorithm = a.algo
  c.fl.rounds = a.rounds
  return c


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ``ValueError`` naming the bad field and the fix, before anything is written."""
  if c.data.name not in DATASETS:
    raise ValueError(f"config.data.name={c.data.name!r} is unknown; choose one of {DATASETS}.")
  if c.data.imbalance_factor < 1:
    raise ValueError(
      f"config.data.imbalance_factor={c.data.imbalance_factor} must be >= 1 "
      "(IF = n_max / n_min; CReFF's --imb_factor 0.01 is IF=100)."
    )
  if c.data.partition not in PARTITIONS:
    raise ValueError(f"config.data.partition={c.data.partition!r}; choose one of {PARTITIONS}.")
  if c.data.dirichlet_alpha <= 0:
    raise ValueError(
      "config.data.dirichlet_alpha must be > 0 (the paper: 0.5 CIFAR, 0.1 ImageNet-LT)."
    )
  if c.data.placement not in ("device", "host"):
    raise ValueError("config.data.placement must be 'device' or 'host'.")
  if c.data.name == "imagenet_lt":
    manual = c.data.manual_dir or os.path.expanduser("~/tensorflow_datasets/downloads/manual")
    if not os.path.isdir(manual):
      raise ValueError(
        f"ImageNet-LT needs the ImageNet-2012 tars in a manual directory, and "
        f"{manual!r} does not exist: download ILSVRC2012_img_train.tar and "
        "ILSVRC2012_img_val.tar there, or set --config.data.manual_dir."
      )
    if not c.data.image_size:
      raise ValueError("ImageNet-LT images vary in size: set config.data.image_size (e.g. 224).")
  algorithms.create(c.fl)  # unknown algorithm -> clear error
  resnet.create_model(c.model, num_classes=2)  # unknown model or conv_impl -> clear error
  if c.fl.num_clients < 1:
    raise ValueError("config.fl.num_clients must be >= 1.")
  if not 1 <= c.fl.clients_per_round <= c.fl.num_clients:
    raise ValueError(
      f"config.fl.clients_per_round={c.fl.clients_per_round} must be between 1 "
      f"and config.fl.num_clients={c.fl.num_clients}."
    )
  for field in ("rounds", "local_epochs", "batch_size"):
    if c.fl[field] < 1:
      raise ValueError(f"config.fl.{field}={c.fl[field]} must be >= 1.")
  if c.fl.client_parallelism not in rounds.STRATEGIES:
    raise ValueError(
      f"config.fl.client_parallelism={c.fl.client_parallelism!r}; choose one of "
      f"{rounds.STRATEGIES}."
    )
  unknown = [s for s in c.stages.split(",") if s and s not in STAGES]
  if unknown:
    raise ValueError(f"config.stages names {unknown}; the stages built so far are {STAGES}.")
  if c.checkpoint.every < 1 or c.checkpoint.keep < 1:
    raise ValueError("config.checkpoint.every and .keep must be >= 1.")
