"""CCVR (Luo et al., NeurIPS 2021, "No Fear of Heterogeneity: Classifier Calibration for
Federated Learning with Non-IID Data", Sec. 4, Alg. 1): FedAvg plus classifier calibration with
virtual representations.

Every sampled client k computes, with the global model it received (eval mode), the features
``z = f(x)`` of its examples and uploads per class c the count ``N_c^k``, mean ``mu_c^k`` and
unbiased covariance ``Sigma_c^k`` (ddof 1; 0 when ``N_c^k < 2``). The server pools them exactly
(Sec. 4, the global mean and covariance):

  N_c = sum_k N_c^k,    mu_c = sum_k N_c^k / N_c mu_c^k,
  Sigma_c = sum_k (N_c^k - 1) / (N_c - 1) Sigma_c^k + sum_k N_c^k / (N_c - 1) mu_c^k mu_c^k^T
            - N_c / (N_c - 1) mu_c mu_c^T,

computed in the equal, better-conditioned form ``sum_k N_c^k (mu_c^k - mu_c)(mu_c^k - mu_c)^T``
for the last two terms (``sum_k N_c^k mu_c^k = N_c mu_c``), then draws ``num_virtual``
virtual features per class from ``N(mu_c, Sigma_c)`` and re-trains the classifier on them
(cross-entropy, plain SGD, ``classifier.retrain``), starting from the global classifier.
Tail classes have ``N_c`` below the feature width, so ``Sigma_c`` is singular: sampling uses
``eigh`` (eigenvalues within round-off of 0, negative ones included, set to 0), ``mu + V sqrt(L) z``, not Cholesky.
A class with ``N_c = 1`` has ``Sigma_c = 0`` (its virtual features are its mean); a class no
sampled client holds gets none.

Calibration runs in every round's server step; the calibrated classifier is the evaluated model
(``eval_variables``), while the clients continue from the FedAvg model. The statistics come
from the model the clients received, so round t evaluates the aggregated backbone with a
classifier calibrated on the previous global model's features (the paper calibrates once,
after training, where the two coincide).

Defaults (``config.fl.ccvr``): the paper gives neither the number of virtual features nor the
calibration schedule, and the authors published no code. We take FL-bench's CCVR
(KarhouTam/FL-bench src/server/ccvr.py:19, ``calibrate_classifier``): 200 virtual features
per class, one epoch of SGD with the clients' learning rate (0.1 here, CReFF's) and batch size
(32), from the global classifier.

References:
  Luo et al. 2021, Sec. 4 (Eq. for mu_c, Sigma_c; Alg. 1).
  KarhouTam/FL-bench src/server/ccvr.py (``compute_classes_mean_cov``,
  ``generate_virtual_representation``, ``calibrate_classifier``).
"""

import math

import jax
import jax.numpy as jnp

from fedllava import errors
from fedllava.algorithms import base, classifier


def class_statistics(features, labels, valid, num_classes: int):
  """One client's per-class ``(counts [C], means [C, F], covariances [C, F, F])`` (ddof 1).

  Only examples with ``valid > 0`` count. Features are centred on the client's mean first
  (the covariance does not change; float32 loses less).
  """
  dtype = features.dtype
  onehot = jax.nn.one_hot(labels, num_classes, dtype=dtype) * valid[:, None].astype(dtype)
  counts = jnp.sum(onehot, axis=0)
  shift = jnp.sum(valid[:, None] * features, 0) / jnp.maximum(jnp.sum(valid), 1.0)
  g = features - shift
  means_g = (onehot.T @ g) / jnp.maximum(counts, 1.0)[:, None]
  # one class at a time: [N, F] per step, never [N, C, F]
  second = jax.lax.map(lambda w: (g * w[:, None]).T @ g, onehot.T)
  scatter = second - counts[:, None, None] * means_g[:, :, None] * means_g[:, None, :]
  covs = jnp.where(
    (counts >= 2)[:, None, None], scatter / jnp.maximum(counts - 1.0, 1.0)[:, None, None], 0.0
  )
  means = jnp.where((counts > 0)[:, None], means_g + shift, 0.0)
  return counts, means, covs


def pool_statistics(counts, means, covs):
  """The server's exact pooled ``(N_c [C], mu_c [C, F], Sigma_c [C, F, F])`` from the clients'
  stacked ``counts [M, C]``, ``means [M, C, F]``, ``covs [M, C, F, F]`` (paper Sec. 4)."""
  total = jnp.sum(counts, axis=0)
  mu = jnp.einsum("mc,mcf->cf", counts, means) / jnp.maximum(total, 1.0)[:, None]
  d = means - mu[None]
  scatter = jnp.einsum("mc,mcfg->cfg", jnp.maximum(counts - 1.0, 0.0), covs)
  scatter = scatter + jnp.einsum("mc,mcf,mcg->cfg", counts, d, d)
  cov = jnp.where(
    (total >= 2)[:, None, None], scatter / jnp.maximum(total - 1.0, 1.0)[:, None, None], 0.0
  )
  return total, mu, cov


def sample_virtual(key, means, covs, num: int):
  """``[C, num, F]`` draws from ``N(mu_c, Sigma_c)`` by ``mu + V sqrt(L) z`` with
  ``Sigma = V diag(L) V^T`` (``eigh``: works for the singular covariances of tail classes)."""
  # One class at a time, never a batched ``eigh``: on CPU, jaxlib's LAPACK kernel fans a batch
  # out over XLA's intra-op thread pool and waits for it, which deadlocks when several devices
  # run this replicated step at once (8 host devices: the first round never finished). One
  # matrix runs in the calling thread (see also ``sharding.single_threaded_cpu_lapack``).
  eigvals, eigvecs = jax.lax.map(jnp.linalg.eigh, covs)
  # Eigenvalues within round-off of 0 are 0: a singular covariance's null space has arbitrary
  # eigenvectors, which must not add noise of size sqrt(round-off) in arbitrary directions.
  tol = covs.shape[-1] * jnp.finfo(covs.dtype).eps * jnp.max(jnp.abs(eigvals), -1, keepdims=True)
  eigvals = jnp.where(eigvals > tol, eigvals, 0.0)
  scale = eigvecs * jnp.sqrt(eigvals)[:, None, :]
  z = jax.random.normal(key, (means.shape[0], num, means.shape[1]), means.dtype)
  return means[:, None, :] + jnp.einsum("cfg,cng->cnf", scale, z)


def create(
  num_virtual: int = 200, learning_rate: float = 0.1, epochs: int = 1, batch_size: int = 32
) -> base.FLAlgorithm:
  def client_upload(model_fn, global_variables, local_variables, data, message):
    del local_variables, message
    feats = model_fn(global_variables, data.images)["features"]
    num_classes = global_variables["params"]["classifier"]["kernel"].shape[1]
    counts, means, covs = class_statistics(feats, data.labels, data.valid, num_classes)
    return {"statistics": {"counts": counts, "means": means, "covs": covs}}

  def server_init(variables, num_classes, key):
    del num_classes, key
    return {"classifier": jax.tree.map(jnp.array, variables["params"]["classifier"])}

  def server_step(ctx: base.ServerContext, model_fn):
    del model_fn
    stats = ctx.uploads["statistics"]
    clf = ctx.variables["params"]["classifier"]
    dtype = clf["kernel"].dtype
    stats = jax.tree.map(lambda x: x.astype(dtype), stats)
    total, mu, cov = pool_statistics(stats["counts"], stats["means"], stats["covs"])
    k_sample, k_shuffle = jax.random.split(ctx.key)
    virtual = sample_virtual(k_sample, mu, cov, num_virtual)
    num_classes, feature_dim = mu.shape
    labels = jnp.repeat(jnp.arange(num_classes), num_virtual)
    valid = jnp.repeat(total > 0, num_virtual)
    calibrated, loss = classifier.retrain(
      clf,
      virtual.reshape(-1, feature_dim),
      labels,
      k_shuffle,
      learning_rate=learning_rate,
      epochs=epochs,
      batch_size=batch_size,
      valid=valid,
    )
    return ctx.variables, {"classifier": calibrated}, {"calibration_loss": loss}

  def eval_variables(variables, state):
    return classifier.with_classifier(variables, state["classifier"])

  return base.create(
    "ccvr",
    client_upload=client_upload,
    server_init=server_init,
    server_step=server_step,
    eval_variables=eval_variables,
  )


def from_config(fl) -> base.FLAlgorithm:
  c = fl.ccvr
  return create(c.num_virtual, c.learning_rate, c.epochs, c.batch_size)


def validate(fl) -> None:
  c = fl.ccvr
  for field in ("num_virtual", "epochs", "batch_size"):
    if not (isinstance(c[field], int) and c[field] >= 1):
      raise errors.ConfigError(f"config.fl.ccvr.{field}={c[field]} must be an integer >= 1.")
  if not (c.learning_rate > 0 and math.isfinite(c.learning_rate)):
    raise errors.ConfigError(
      f"config.fl.ccvr.learning_rate={c.learning_rate} must be a finite number > 0."
    )
