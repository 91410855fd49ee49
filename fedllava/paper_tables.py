"""The paper's Table 2 and Table 3, copied by hand, keyed by our method names.

Source: MLLM-LLaVA-FL (/work/shared/paper/mllm-llava-fl.txt), Table 2 (top-1 % on CIFAR-10-LT
and CIFAR-100-LT at IF 100 / 50 / 10; the paper takes the baselines from CReFF [44] and CLIP2FL
[45]) and Table 3 (ImageNet-LT: all / many / medium / few). The sweep (``fedllava/sweep.py``)
prints these next to its own numbers; nothing here is computed.

Row names: the paper's row -> our registry's name (``fedllava.algorithms.ALGORITHMS``, or a name
other engineers are adding); the paper's own method is ``"ours"``.
"""

from __future__ import annotations

from typing import Optional

# The paper's row name for each of our names (Table 3 spells CReFF "CRFF").
PAPER_NAMES = {
  "fedavg": "FedAvg",
  "fedavgm": "FedAvgM",
  "fedprox": "FedProx",
  "feddf": "FedDF",
  "fedbe": "FedBE",
  "ccvr": "CCVR",
  "fednova": "FedNova",
  "fedfocal": "Fed-Focal Loss",
  "ratioloss": "Ratio Loss",
  "taunorm": "FedAvg+ τ-norm",
  "creff": "CReFF",
  "clip2fl": "CLIP2FL",
  "ours": "MLLM-LLaVA-FL",
}

# Table 2: name -> (data set, IF) -> top-1 (%).
_T2_COLUMNS = (
  ("cifar10", 100),
  ("cifar10", 50),
  ("cifar10", 10),
  ("cifar100", 100),
  ("cifar100", 50),
  ("cifar100", 10),
)
_T2_ROWS = {
  "fedavg": (56.17, 59.36, 77.45, 30.34, 36.35, 45.87),
  "fedavgm": (52.03, 57.11, 70.81, 30.80, 35.33, 44.66),
  "fedprox": (56.92, 60.89, 76.53, 31.67, 36.30, 46.10),
  "feddf": (55.15, 58.74, 76.51, 31.43, 36.22, 46.19),
  "fedbe": (55.79, 59.55, 77.78, 31.97, 36.39, 46.25),
  "ccvr": (69.53, 71.89, 78.48, 33.43, 36.98, 46.88),
  "fednova": (57.79, 63.91, 77.79, 32.64, 36.62, 46.75),
  "fedfocal": (53.83, 57.42, 73.74, 30.67, 35.25, 45.52),
  "ratioloss": (59.75, 64.77, 78.14, 32.95, 36.88, 46.79),
  "taunorm": (49.95, 51.41, 72.08, 26.22, 33.71, 43.65),
  "creff": (70.55, 73.08, 80.71, 34.67, 37.64, 47.08),
  "clip2fl": (73.37, 75.35, 81.18, 37.56, 41.29, 48.20),
  "ours": (75.49, 76.11, 81.45, 39.50, 42.34, 48.87),
}
TABLE2 = {name: dict(zip(_T2_COLUMNS, row)) for name, row in _T2_ROWS.items()}

# Table 3 (ImageNet-LT): name -> {"top1" (the paper's "All"), "many", "medium", "few"} (%).
_T3_ROWS = {
  "fedavg": (23.85, 34.92, 19.18, 7.10),
  "fedavgm": (22.57, 33.93, 18.55, 6.73),
  "fedprox": (22.99, 34.25, 17.06, 6.37),
  "feddf": (21.63, 31.78, 15.52, 4.48),
  "ccvr": (25.49, 36.72, 20.24, 9.26),
  "fedfocal": (21.60, 31.74, 15.77, 5.52),
  "ratioloss": (24.31, 36.33, 18.14, 7.41),
  "taunorm": (21.58, 31.66, 15.76, 4.33),
  "creff": (26.31, 37.44, 21.87, 10.29),
  "ours": (27.53, 30.85, 25.89, 25.58),
}
TABLE3 = {name: dict(zip(("top1", "many", "medium", "few"), row)) for name, row in _T3_ROWS.items()}


def paper_setting(dataset: str, imbalance_factor: float) -> Optional[str]:
  """Which of the paper's tables covers this data set at this IF ("Table 2", "Table 3"), or None."""
  if dataset in ("cifar10", "cifar100") and float(imbalance_factor) in (100.0, 50.0, 10.0):
    return "Table 2"
  if dataset == "imagenet_lt":  # long-tailed as published (our imbalance_factor 1 keeps it)
    return "Table 3" if float(imbalance_factor) == 1.0 else None
  return None


def lookup(name: str, dataset: str, imbalance_factor: float) -> Optional[dict]:
  """The paper's numbers for our method ``name`` in this setting, or None where it has none.

  Returns:
    ``{"top1": x}`` from Table 2, ``{"top1", "many", "medium", "few"}`` from Table 3, or None
    (another data set or IF, or a method the table does not list).
  """
  table = paper_setting(dataset, imbalance_factor)
  if table == "Table 2":
    value = TABLE2.get(name, {}).get((dataset, int(imbalance_factor)))
    return None if value is None else {"top1": value}
  if table == "Table 3":
    return dict(TABLE3[name]) if name in TABLE3 else None
  return None
