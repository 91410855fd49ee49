"""The FL method contract: five places a method may change, each with FedAvg's default.

A method is a small bundle of pure functions over pytrees (fedjax's ``FederatedAlgorithm``,
optax's ``GradientTransformation``, TFF's composed learning process), every part optional:

==============================  ===========================================  =======================
place                           field (default)                              where it runs
==============================  ===========================================  =======================
client loss on a batch          ``client_loss`` (masked cross-entropy)       vmapped local step
local penalty                   ``local_penalty`` (none; FedProx)            vmapped local step
client upload besides params    ``client_upload`` (none)                     end of each client
aggregation                     ``pseudo_gradient`` + ``server_optimizer``   reduction over clients
                                (``w - sum_k p_k w_k`` + ``sgd(1.0)``: Eq. 4)
                                or ``aggregate`` (whole model, state, key)
server step after aggregation   ``server_step`` (none)                       server, same jit
==============================  ===========================================  =======================

plus ``message`` (what the server sends every client besides the global model, e.g. class
weights or a re-trained classifier; default nothing) and ``eval_variables`` (the model that is
evaluated, when it is not the one sent to the clients: CReFF's and CCVR's re-trained classifier,
tau-norm's normalised one; default the global model). A method with a server step keeps its own
state (``server_init``), checkpointed with the run.

Clients upload parameters and BN statistics always; ``client_upload`` returns what else leaves
a client, by kind: ``{"statistics": tree}`` (CCVR's per-class feature moments) or
``{"gradients": tree}`` (CReFF's, CLIP2FL's per-class classifier gradients). The round logs
every kind's bytes: the paper's privacy argument (Table 1) is about exactly that.

``aggregate`` replaces ``pseudo_gradient`` and the weighted mean of BN statistics when the
aggregation needs the whole uploaded model (parameters and BN statistics), the method's state
and the round's key: client-level DP (``fedllava/privacy.py``) clips the whole update and adds
noise there. Methods without it keep the FedAvg path unchanged.

Per-example side data (``side_data``, default None): a method may ask for one more array per
training example, computed once on the host before round 1 and kept beside the client store
as ``[K, N_max, ...]`` (``"teacher_logits"``: CLIP's zero-shot logits ``[K, N_max, C]`` float32
of every client image, cached like stage 3's q; CLIP2FL's distillation). The round stacks the
sampled clients' rows in ``RoundInputs.side``; the local step gathers them with the batch's
``idx`` and calls ``client_loss(outputs, labels, weights, message, side=side[idx])``. Methods
without side data are called without ``side`` (their ``client_loss`` is unchanged).
Server-side: ``server_data="class_text_embeddings"`` hands the server step CLIP's unit text
embedding of every class ``[C, D]`` (CLIP2FL's federated-feature contrast).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from fedllava import supervised

PyTree = Any
UPLOAD_KINDS = ("statistics", "gradients")


class ClientData(NamedTuple):
  """What ``client_upload`` sees of one client, inside the vmapped round.

  Attributes:
    images: uint8 ``[N_max, H, W, C]``, the client's data padded with copies of its first
      example.
    labels: int32 ``[N_max]``.
    valid: ``[N_max]`` 1.0 for the client's ``n_k`` real examples, 0.0 for the padding.
    key: the client's key for this round (independent of its augmentation keys).
  """

  images: Any
  labels: Any
  valid: Any
  key: Any


class ServerContext(NamedTuple):
  """What ``server_step`` sees after aggregation (all on device, inside the round's jit).

  Attributes:
    variables: the aggregated global model ``{"params", "batch_stats"}``.
    state: the method's own state (``server_init``'s tree).
    client_variables: every sampled client's model, stacked on the client axis.
    uploads: ``client_upload``'s output stacked on the client axis (``{}`` without one).
    weights: ``[M]`` FedAvg weights ``|D_k| / sum |D_k|``, 0 for padding clients.
    server_data: the server's own images (e.g. FedDF's unlabeled pool), ``{"images",
      "labels"}`` for a labelled set (Ratio Loss's), or None.
    key: this round's server key.
  """

  variables: PyTree
  state: PyTree
  client_variables: PyTree
  uploads: PyTree
  weights: Any
  server_data: Any
  key: Any


def no_penalty(params: PyTree, global_params: PyTree) -> jax.Array:
  """The FedAvg local objective adds nothing."""
  del params, global_params
  return jnp.zeros((), jnp.float32)


masked_mean = supervised.weighted_mean  # sum_i w_i v_i / max(sum_i w_i, 1)


def cross_entropy(outputs: dict, labels: jax.Array, weights: jax.Array, message=None):
  """FedAvg's local loss: the cross-entropy averaged over the batch's real examples."""
  del message
  return supervised.masked_cross_entropy(outputs["logits"], labels, weights)


def weighted_mean(stacked: PyTree, weights: jax.Array) -> PyTree:
  """``sum_k weights[k] * stacked[k]`` for every leaf (weights sum to one)."""
  return jax.tree.map(lambda x: jnp.tensordot(weights.astype(x.dtype), x, axes=1), stacked)


def mean_delta(
  global_params: PyTree, client_params: PyTree, weights: jax.Array, num_steps: jax.Array
) -> PyTree:
  """FedAvg's pseudo-gradient ``w_g - sum_k p_k w_k`` with ``p_k = |D_k| / sum |D_k|`` (Eq. 4)."""
  del num_steps
  avg = weighted_mean(client_params, weights)
  return jax.tree.map(lambda g, a: g - a, global_params, avg)


class AggregateContext(NamedTuple):
  """What ``aggregate`` sees (inside the round's jit, before the server optimizer).

  Attributes:
    variables: the global model ``{"params", "batch_stats"}`` the clients started from.
    client_variables: every sampled client's model, stacked on the client axis.
    weights: ``[M]`` FedAvg weights, 0 for padding clients.
    num_steps: ``[M]`` local steps each client ran.
    state: the method's own state (``server_init``'s tree).
    key: this round's server key (the same for a resumed round: ``fold_in(key, round)``).
  """

  variables: PyTree
  client_variables: PyTree
  weights: Any
  num_steps: Any
  state: PyTree
  key: Any


class FLAlgorithm(NamedTuple):
  """A federated method as pure functions (see the module docstring); defaults are FedAvg's.

  Attributes:
    name: the ``config.fl.algorithm`` name.
    local_penalty: ``(params, global_params) -> scalar`` added to every local loss.
    pseudo_gradient: ``(global_params, client_params, weights, num_steps) -> delta``.
    server_optimizer: optax transformation applied to the delta.
    client_loss: ``(outputs, labels, weights, message) -> scalar``, the mean loss of one local
      batch; ``outputs`` is the model's dict (``logits``, ``features``), ``weights`` 0 marks a
      padding example, ``message`` is what ``message`` computed this round (or None). A method
      with ``side_data`` gets one more keyword, ``side``: its side array's rows for the batch.
    client_upload: ``(model_fn, global_variables, local_variables, data: ClientData, message)
      -> {kind: tree}`` with kinds from ``UPLOAD_KINDS``; ``model_fn(variables, uint8 images)``
      is the model in eval mode on normalised images (its output dict).
    server_init: ``(variables, num_classes, key) -> state`` of a method with a server step.
    server_step: ``(ServerContext, model_fn) -> (variables sent to clients, state, metrics)``.
    message: ``(variables, state) -> tree`` sent to every client with the global model.
    eval_variables: ``(variables, state) -> variables`` that are evaluated.
    server_data: which server-side data the server step needs: None, "unlabeled" (the
      training images that the long tail leaves out, without labels: FedDF, FedBE),
      "labeled_balanced" (labelled images of every class, held out of the training split
      before the long tail: Ratio Loss's monitor; the method's module declares the count as
      ``server_labeled_per_class(fl_config) -> (count, field)``, which the data build reads) or
      "class_text_embeddings" (CLIP's ``[C, D]`` unit class text embeddings, from
      ``config.align.teacher``: CLIP2FL).
    side_data: per-example data the local loss needs: None or "teacher_logits" (CLIP's
      zero-shot logits of each client image, ``config.align.teacher``: CLIP2FL).
    aggregate: ``(AggregateContext) -> (pseudo_gradient, batch_stats, state, metrics)``; when
      set it replaces ``pseudo_gradient`` and the weighted BN mean (client-level DP); the
      ``server_optimizer`` then applies to its pseudo-gradient.
  """

  name: str
  local_penalty: Callable = no_penalty
  pseudo_gradient: Callable = mean_delta
  server_optimizer: optax.GradientTransformation = optax.sgd(1.0)
  client_loss: Callable = cross_entropy
  client_upload: Optional[Callable] = None
  server_init: Optional[Callable] = None
  server_step: Optional[Callable] = None
  message: Optional[Callable] = None
  eval_variables: Optional[Callable] = None
  server_data: Optional[str] = None
  aggregate: Optional[Callable] = None
  side_data: Optional[str] = None


SERVER_DATA = (None, "unlabeled", "labeled_balanced", "class_text_embeddings")
SIDE_DATA = (None, "teacher_logits")


def create(name: str, **parts) -> FLAlgorithm:
  """An ``FLAlgorithm`` with FedAvg's defaults for every part not given (or given as None)."""
  unknown = set(parts) - set(FLAlgorithm._fields)
  if unknown:
    raise TypeError(f"unknown method parts {sorted(unknown)}; see FLAlgorithm")
  if parts.get("server_data") not in SERVER_DATA or parts.get("side_data") not in SIDE_DATA:
    raise TypeError(f"server_data must be one of {SERVER_DATA}, side_data one of {SIDE_DATA}")
  return FLAlgorithm(name, **{k: v for k, v in parts.items() if v is not None})


def init_server_state(algorithm: FLAlgorithm, variables: PyTree, num_classes: int, key) -> PyTree:
  """The server's state: the optax state, plus the method's own under ``"method"`` if it has one.

  A method without ``server_init`` keeps the plain optax state (the layout of every checkpoint
  written before methods had state).
  """
  opt = algorithm.server_optimizer.init(variables["params"])
  if algorithm.server_init is None:
    return opt
  return {"opt": opt, "method": algorithm.server_init(variables, num_classes, key)}


def split_server_state(algorithm: FLAlgorithm, server_state: PyTree):
  """``(optax state, method state or None)``."""
  if algorithm.server_init is None:
    return server_state, None
  return server_state["opt"], server_state["method"]


def join_server_state(algorithm: FLAlgorithm, opt_state: PyTree, method_state: PyTree) -> PyTree:
  if algorithm.server_init is None:
    return opt_state
  return {"opt": opt_state, "method": method_state}


def evaluated(algorithm: FLAlgorithm, variables: PyTree, server_state: PyTree) -> PyTree:
  """The variables to evaluate: ``eval_variables`` of the method, else the global model."""
  if algorithm.eval_variables is None:
    return variables
  return algorithm.eval_variables(variables, split_server_state(algorithm, server_state)[1])


def server_update(
  algorithm: FLAlgorithm,
  global_params: PyTree,
  server_state: PyTree,
  client_params: PyTree,
  weights: jax.Array,
  num_steps: jax.Array,
):
  """Applies one aggregation step; returns ``(new_global_params, new_optax_state)``.

  ``server_state`` is the optax state here (``split_server_state`` gives it).
  """
  delta = algorithm.pseudo_gradient(global_params, client_params, weights, num_steps)
  updates, server_state = algorithm.server_optimizer.update(delta, server_state, global_params)
  return optax.apply_updates(global_params, updates), server_state
