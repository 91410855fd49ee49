"""pfl-research (Apple's ``pfl``, PyTorch backend) as a ``fl_round.py`` contender.

One round = ``FederatedAveraging.run`` for one central iteration over a cohort of the same
clients (``SimulatedBackend``, ``WeightByDatapoints``, central SGD lr 1.0 = FedAvg), local SGD
lr 0.1 for the preset's epochs and batch size on CReFF's ResNet-8. Each client's uint8 images
sit on the device as tensors; normalisation and per-example crop + flip run inside the model's
``loss`` (pfl has no augmentation hook). pfl averages the *parameters* (its model difference);
BN running statistics are buffers it does not aggregate, a difference from CReFF's FedAvg that
does not change the cost of a round. ``pfl`` needs ``packaging<26``: in an environment that has a
newer one, install it beside (``pip install --no-deps --target DIR pfl dp-accounting
prv-accountant multiprocess dill``) and put DIR on ``PFL_SITE`` (or ``PYTHONPATH``).
"""

from __future__ import annotations

import os
import sys

import numpy as np


def _import_pfl():
  site = os.environ.get("PFL_SITE", "/tmp/pfl_site")
  if os.path.isdir(site) and site not in sys.path:
    sys.path.append(site)
  os.environ.setdefault("PFL_PYTORCH_DEVICE", "cuda" if _cuda() else "cpu")
  import pfl  # noqa: F401  pylint: disable=g-import-not-at-top

  return pfl


def _cuda() -> bool:
  import torch  # pylint: disable=g-import-not-at-top

  return torch.cuda.is_available()


def make_round(images_u8, labels, sizes, s: dict, mean, std, device: str):
  """Returns ``(run, state)``: ``run()`` trains one pfl round; ``state["leaf"]`` the head."""
  _import_pfl()
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F
  import torch_reference as tr
  from pfl.aggregate.simulate import SimulatedBackend
  from pfl.aggregate.weighting import WeightByDatapoints
  from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
  from pfl.data.dataset import Dataset
  from pfl.data.federated_dataset import FederatedDataset
  from pfl.data.sampling import get_user_sampler
  from pfl.hyperparam import NNTrainHyperParams
  from pfl.metrics import Weighted
  from pfl.model.pytorch import PyTorchModel

  dev = torch.device(device)
  m_t = torch.tensor(mean, device=dev).view(1, -1, 1, 1)
  s_t = torch.tensor(std, device=dev).view(1, -1, 1, 1)
  pad = s["crop"]

  class PflResNet8(tr.ResNet8):
    def _prep(self, u8):
      x = (u8.permute(0, 3, 1, 2).float() / 255.0 - m_t) / s_t
      b, _, h, w = x.shape
      xp = F.pad(x, (pad,) * 4)
      off = torch.randint(0, 2 * pad + 1, (2, b), device=dev)
      rows = (off[0, :, None] + torch.arange(h, device=dev))[:, None, :, None]
      cols = (off[1, :, None] + torch.arange(w, device=dev))[:, None, None, :]
      x = xp[
        torch.arange(b, device=dev)[:, None, None, None],
        torch.arange(3, device=dev)[None, :, None, None],
        rows,
        cols,
      ]
      f = torch.rand(b, device=dev) < 0.5
      return torch.where(f[:, None, None, None], x.flip(-1), x).contiguous(
        memory_format=torch.channels_last
      )

    def loss(self, u8, y, eval=False):  # noqa: A002  (pfl's signature)
      self.train(not eval)
      return F.cross_entropy(self(self._prep(u8)), y)

    @torch.no_grad()
    def metrics(self, u8, y, eval=True):  # noqa: A002
      self.eval()
      logits = self(self._prep(u8))
      n = len(y)
      return {"loss": Weighted(float(F.cross_entropy(logits, y, reduction="sum")), n)}

  torch.manual_seed(0)
  net = PflResNet8(s["width"], 10).to(dev).to(memory_format=torch.channels_last)
  data = {
    uid: (
      torch.from_numpy(np.ascontiguousarray(images_u8[uid][:n])).to(dev),
      torch.from_numpy(np.asarray(labels[uid][:n], np.int64)).to(dev),
    )
    for uid, n in enumerate(sizes)
  }

  def make_user(uid):
    return Dataset(raw_data=list(data[uid]), user_id=uid)

  users = list(data)
  train = FederatedDataset(make_user, get_user_sampler("minimize_reuse", users))
  backend = SimulatedBackend(
    training_data=train, val_data=None, postprocessors=[WeightByDatapoints()]
  )
  model = PyTorchModel(
    model=net,
    local_optimizer_create=torch.optim.SGD,
    central_optimizer=torch.optim.SGD(net.parameters(), lr=1.0),
  )
  algo_params = NNAlgorithmParams(
    central_num_iterations=1,
    evaluation_frequency=10**9,
    train_cohort_size=len(users),
    val_cohort_size=None,
  )
  train_params = NNTrainHyperParams(
    local_num_epochs=s["epochs"], local_learning_rate=0.1, local_batch_size=s["batch"]
  )
  state = {}

  def run():  # a fresh algorithm object: its central-iteration counter starts at 0
    FederatedAveraging().run(algo_params, backend, model, train_params, None, [])
    if dev.type == "cuda":
      torch.cuda.synchronize()
    state["leaf"] = net.fc.weight.detach().double().cpu().numpy().T

  return run, state
