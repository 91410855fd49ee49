"""CLIP2FL (Shi et al., AAAI 2024, "CLIP-Guided Federated Learning on Heterogeneous and
Long-Tailed Data"), as the authors' code does it: CReFF (``creff``) plus CLIP on both sides.

Client side (Eq. 1): the local loss adds knowledge distillation from CLIP's zero-shot logits
``t_i`` of the client's own image ``i`` (``exp(logit_scale) cos(image, class text)``: the code's
``100 * f_img @ f_text.T``) into the local model's logits ``s_i``, at temperature ``T``:

  L = 1/B sum_i CE(s_i, y_i) + alpha * T^2 / B sum_i KL(softmax(t_i / T) || softmax(s_i / T)),

the mean over the batch's real examples (``KDLoss``, ``reduction='batchmean'``). The teacher
logits are computed once for every client image (``side_data="teacher_logits"``) and gathered
with the batch's indices in the local step.

Server side (Eq. 8): the federated features ``S`` (``C x n`` rows) move by plain SGD on CReFF's
gradient-matching loss plus ``contrast_alpha`` times a supervised contrastive loss against CLIP's
class text embeddings ``u_c`` (unit rows; ``SupConLoss_text``, temperature ``tau``):

  a_ij = <S_i, u_{y_j}> / tau,   P(i) = {j != i : y_j = y_i},
  L_con = mean_{i: P(i) != {}} -1/|P(i)| sum_{j in P(i)} [a_ij - log sum_{j' != i} exp(a_ij')].

Classifier re-training, gradients uploaded (kind "gradients"), evaluation of the re-trained
classifier and the round order are CReFF's. The text embeddings reach the server step as
``server_data="class_text_embeddings"`` (``[C, D]``; ``D`` must be the model's feature size,
as in the code, where both are 512).

Deviations: the code feeds CLIP the 224-pixel resize of the *un-augmented* image while the local
model sees the augmented one (main.py:393-406); we do the same (the logits are precomputed from
the stored image), at the teacher's input size. Templates: the code's single "a photo of a {}"
(``templates="default"``; ours ends with a full stop). CReFF's DSA of the client gradients'
images (``config.fl.creff.dsa``) and its deviations apply.

Defaults (``config.fl.clip2fl``) are the code's options.py: alpha 1 (``--alpha``, Eq. 1's
weight), T 3 (``--T``), contrast_alpha 0.001 (``--contrast_alpha``), tau 0.1 (``--ins_temp``);
the CReFF part's as ``config.fl.creff`` (options.py:17-26, the same values).

References:
  shijiangming1/CLIP2FL main.py:126-143 (``KDLoss``), 381-414 (``local_train``: Eq. 1,
  ``loss1 + args.alpha * loss2``), 195-243 (``update_feature_syn``: matching + Eq. 8's
  ``contrast_alpha * contrast_loss``), 476-487 (text features, one prompt, repeated per feature),
  540-543 (round order); losses.py:98-144 (``SupConLoss_text``); options.py:44-55.
"""

# config.fl sections this method reads (algorithms.config_sections): its own and CReFF's.
CONFIG_SECTIONS = ("clip2fl", "creff")


import math

import jax
import jax.numpy as jnp

from fedllava import errors
from fedllava.algorithms import base, creff


def kd_loss(student_logits, teacher_logits, weights, temperature: float):
  """``T^2 * sum_i w_i KL(softmax(t_i/T) || softmax(s_i/T)) / sum_i w_i`` (``KDLoss``)."""
  t = temperature
  p = jax.nn.softmax(teacher_logits.astype(student_logits.dtype) / t, axis=-1)
  kl = jnp.sum(p * (jnp.log(jnp.maximum(p, 1e-30)) - jax.nn.log_softmax(student_logits / t)), -1)
  kl = jnp.where(p.sum(-1) > 0, kl, 0.0)
  return t * t * base.masked_mean(kl, weights)


def text_contrast(features, labels, text):
  """``SupConLoss_text`` without the temperature (pass ``features / tau``): ``features
  [N, D]``, ``labels [N]``, ``text [C, D]`` (class ``c``'s unit text embedding)."""
  n = features.shape[0]
  a = features @ text[labels].T  # a_ij = <S_i, u_{y_j}>
  a = a - jax.lax.stop_gradient(jnp.max(a, axis=1, keepdims=True))
  off = 1.0 - jnp.eye(n, dtype=a.dtype)
  pos = (labels[:, None] == labels[None, :]).astype(a.dtype) * off
  log_prob = a - jnp.log(jnp.sum(jnp.exp(a) * off, axis=1, keepdims=True))
  single = (jnp.sum(pos, axis=1) == 0).astype(a.dtype)
  mean_pos = jnp.sum(pos * log_prob, axis=1) / (jnp.sum(pos, axis=1) + single)
  return jnp.sum(-mean_pos * (1 - single)) / (n - jnp.sum(single))


def create(
  alpha: float = 1.0,
  temperature: float = 3.0,
  contrast_alpha: float = 0.001,
  tau: float = 0.1,
  **creff_kwargs,
) -> base.FLAlgorithm:
  """CReFF's parts with Eq. 1's client loss and Eq. 8's feature update."""
  match_lr = creff_kwargs.get("match_lr", 0.1)
  match_steps = creff_kwargs.get("match_steps", 100)

  def client_loss(outputs, labels, weights, message, side=None):
    del message
    logits = outputs["logits"]
    ce = base.cross_entropy(outputs, labels, weights)
    if alpha == 0:
      return ce
    if side is None:
      raise ValueError("clip2fl's client loss needs the batch's teacher logits (side)")
    return ce + alpha * kd_loss(logits, side, weights, temperature)

  def match_features(feats, clf, targets, has, text):
    num_classes, n, dim = feats.shape
    labels = jnp.repeat(jnp.arange(num_classes), n)

    def loss(s):
      total = creff.matching_loss(s, clf, targets, has)
      if contrast_alpha:
        total = total + contrast_alpha * text_contrast(s.reshape(-1, dim) / tau, labels, text)
      return total

    def step(s, _):
      value, g = jax.value_and_grad(loss)(s)
      return s - match_lr * g, value

    feats, losses = jax.lax.scan(step, feats, None, length=match_steps)
    return feats, losses[-1]

  def matcher(feats, clf, targets, has, ctx):
    text = ctx.server_data
    if contrast_alpha and text.shape[-1] != feats.shape[-1]:
      raise errors.ConfigError(
        f"clip2fl contrasts the {feats.shape[-1]}-dim federated features with CLIP's "
        f"{text.shape[-1]}-dim text embeddings (config.align.teacher); use a model with "
        f"{text.shape[-1]} features (config.model.width) or config.fl.clip2fl.contrast_alpha=0."
      )
    return match_features(feats, clf, targets, has, text.astype(feats.dtype))

  return creff.create(**creff_kwargs, matcher=matcher)._replace(
    name="clip2fl",
    client_loss=client_loss,
    server_data="class_text_embeddings",
    side_data="teacher_logits",
  )


def from_config(fl) -> base.FLAlgorithm:
  c, r = fl.clip2fl, fl.creff
  return create(
    c.alpha,
    c.temperature,
    c.contrast_alpha,
    c.tau,
    **{f: r[f] for f in creff.INT_FIELDS + ("match_lr", "retrain_lr", "dsa", "dsa_strategy")},
  )


def validate(fl) -> None:
  creff.validate(fl)
  c = fl.clip2fl
  for field in ("alpha", "contrast_alpha"):
    if not (c[field] >= 0 and math.isfinite(c[field])):
      raise errors.ConfigError(f"config.fl.clip2fl.{field}={c[field]} must be finite and >= 0.")
  for field in ("temperature", "tau"):
    if not (c[field] > 0 and math.isfinite(c[field])):
      raise errors.ConfigError(f"config.fl.clip2fl.{field}={c[field]} must be finite and > 0.")
  if not isinstance(c.templates, str) or not c.templates:
    raise errors.ConfigError(f"config.fl.clip2fl.templates={c.templates!r} must name templates.")
