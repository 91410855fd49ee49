"""CIFAR-100-LT, the paper's FedAvg setting (Sec. 4.1; CReFF's protocol). Needs TFDS data.

  python -m fedllava.main --config=configs/cifar100_lt.py:if=50

Same federated setting as CIFAR-10-LT. Paper Table 2 FedAvg baseline: 30.34 / 36.35 / 45.87
top-1 at IF 100 / 50 / 10 (not rerun here).
"""
from fedllava import config as config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, **{"if": 100.0, "algo": "fedavg", "rounds": 200})
  c = config_lib.base_config()
  c.name = f"cifar100_lt_if{a['if']:g}_{a.algo}"
  c.data.name = "cifar100"
  c.data.imbalance_factor = a["if"]
  c.fl.algorithm = a.algo
  c.fl.rounds = a.rounds
  return c
