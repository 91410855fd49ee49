"""CIFAR-100-LT, the paper's FedAvg setting (Sec. 4.1; CReFF's protocol). Needs TFDS data.

  python -m fedllava.main --config=configs/cifar100_lt.py:if=50

Same federated setting as CIFAR-10-LT. Paper Table 2 FedAvg baseline: 30.34 / 36.35 / 45.87
top-1 at IF 100 / 50 / 10 (not rerun here).
"""

from configs import common


def get_config(arg=None):
  return common.cifar_lt_config("cifar100", arg)
