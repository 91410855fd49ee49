"""CIFAR-10-LT, the paper's FedAvg setting (Sec. 4.1; CReFF's protocol). Needs TFDS data.

  python -m fedllava.main --config=configs/cifar10_lt.py            # IF=100
  python -m fedllava.main --config=configs/cifar10_lt.py:if=50,algo=fedprox
  python -m fedllava.main --config=configs/cifar10_lt.py --config.data.imbalance_factor=10
  python -m fedllava.main --config=configs/cifar10_lt.py:pretrain   # stage 1 first (GPU; needs
      # llava-hf/llava-1.5-7b-hf and LLaVA-Pretrain under data/, see config.pretrain.*)

20 clients, 8 per round, 10 local epochs, batch 32, SGD lr 0.1, 200 rounds, Dirichlet 0.5,
ResNet-8 (CReFF's scaling 4). Paper Table 2 FedAvg baseline: 56.17 / 59.36 / 77.45 top-1 at
IF 100 / 50 / 10 (reported by CReFF; not rerun here: that needs a GPU and the CIFAR download).
"""

from configs import common


def get_config(arg=None):
  return common.cifar_lt_config("cifar10", arg)
