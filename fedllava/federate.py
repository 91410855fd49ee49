"""Stage 2, federated finetuning (paper Sec. 3.2): the round loop around ``rounds.py``.

``run(config, workdir)`` builds the long-tailed federated data, initialises (or restores)
the global model, and for each round samples clients, runs one jitted sharded round, and
evaluates on the balanced test set. It writes, under ``workdir``: ``config.json``,
``client_histogram.csv``, ``metrics.jsonl`` / ``metrics.csv`` / ``tb/``, ``checkpoints/``,
``report.json``, ``confusion.png`` and ``accuracy.png``.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from fedllava import algorithms, checkpoint, client, evaluate, fileio, metrics, rounds, sharding
from fedllava import config as config_lib
from fedllava.data import federated, partition
from fedllava.models import resnet


def create_predict_fn(model, mean, std, mesh):
  """Jitted ``(variables, uint8 images) -> predicted classes``, batch split over the mesh."""
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)

  def predict(variables, images):
    x = (images.astype(jnp.float32) / 255.0 - mean) / std
    return jnp.argmax(model.apply(variables, x, train=False)["logits"], axis=-1)

  return jax.jit(
    predict,
    in_shardings=(sharding.replicated(mesh), sharding.client_sharding(mesh)),
    out_shardings=sharding.replicated(mesh),
  )


def predict_all(predict_fn, variables, images: np.ndarray, batch_size: int, mesh) -> np.ndarray:
  """Predictions for every image, in fixed-size padded batches (one compilation)."""
  batch = sharding.pad_to_multiple(min(batch_size, len(images)), mesh)
  out = []
  for start in range(0, len(images), batch):
    chunk = images[start : start + batch]
    n = len(chunk)
    if n < batch:
      chunk = np.concatenate([chunk, np.zeros((batch - n,) + chunk.shape[1:], chunk.dtype)])
    out.append(np.asarray(predict_fn(variables, chunk))[:n])
  return np.concatenate(out)


def _named_keys(seed: int) -> dict:
  root = jax.random.PRNGKey(seed)
  return {name: jax.random.fold_in(root, i) for i, name in enumerate(("init", "augment"))}


def run(config, workdir: str) -> dict:
  """Runs (or resumes) federated finetuning; returns the final variables and report."""
  config_lib.validate(config)
  checkpoint.check_config(workdir, config)
  d, fl = config.data, config.fl
  data = federated.build(config)
  print(
    f"[data] {d.name}: {len(data.train)} long-tailed training images "
    f"(IF={d.imbalance_factor:g}) over {fl.num_clients} clients, {len(data.test)} test images"
  )
  print(partition.format_histogram(data.histogram))
  partition.save_histogram(data.histogram, os.path.join(workdir, "client_histogram.csv"))

  mesh = sharding.create_client_mesh(config.mesh.num_devices or None)
  model = resnet.create_model(config.model, data.num_classes)
  keys = _named_keys(config.seed)
  variables = model.init(keys["init"], jnp.zeros((1,) + data.images.shape[2:], jnp.float32))
  algo = algorithms.create(fl)
  state = {"variables": variables, "server_state": algo.server_optimizer.init(variables["params"])}
  repl = sharding.replicated(mesh)
  ckpt = checkpoint.Checkpointer(
    os.path.join(workdir, "checkpoints"), config.checkpoint.every, config.checkpoint.keep
  )
  done = ckpt.latest_round() or 0
  meta = {"best_top1": None, "best_round": None}
  if done:
    state, meta = ckpt.restore(done, state)
    print(f"[resume] restored round {done} from {workdir}/checkpoints")
  state = jax.device_put(state, repl)

  trainer = client.create_local_trainer(
    model,
    algo,
    learning_rate=fl.learning_rate,
    mean=data.norm.mean,
    std=data.norm.std,
    crop_padding=d.crop_padding,
    flip=d.flip,
    per_batch_augment=d.per_batch_augment,
  )
  round_fn = rounds.create_round_fn(trainer, algo, mesh, fl.client_parallelism, fl.group_size)
  predict_fn = create_predict_fn(model, data.norm.mean, data.norm.std, mesh)

  def test_report(variables):
    preds = predict_all(predict_fn, variables, data.test.images, config.eval.batch_size, mesh)
    return evaluate.classification_report(
      data.test.labels, preds, data.num_classes, data.class_counts
    )

  cs = sharding.client_sharding(mesh)
  if d.placement == "device":  # the whole client store lives on device for the run
    store = jax.device_put((data.images, data.labels), repl)
    gather = jax.jit(lambda s, ids: (s[0][ids], s[1][ids]), out_shardings=(cs, cs))
  else:
    store = (data.images, data.labels)
    gather = lambda s, ids: jax.device_put((s[0][ids], s[1][ids]), cs)  # noqa: E731
  pad_to = sharding.pad_to_multiple(fl.clients_per_round, mesh)
  n_max = data.images.shape[1]
  param_dtype = jax.tree.leaves(state["variables"]["params"])[0].dtype
  upload = rounds.upload_bytes(state["variables"])
  print(
    f"[fl] {algo.name}: {fl.clients_per_round} of {fl.num_clients} clients per round, "
    f"{fl.local_epochs} local epochs, batch {fl.batch_size}; each client uploads "
    f"{upload / 2**20:.2f} MiB of parameters + BN statistics per round; {mesh.size} device(s)"
  )

  writer = metrics.MetricWriter(workdir, resume_step=done, active=jax.process_index() == 0)
  report = None
  bar = tqdm(
    range(done, fl.rounds),
    initial=done,
    total=fl.rounds,
    desc="rounds",
    disable=jax.process_index() != 0,
  )
  for r in bar:
    t0 = time.perf_counter()
    selected = rounds.sample_clients(config.seed, r, fl.num_clients, fl.clients_per_round)
    inputs, ids = rounds.build_round_inputs(
      selected,
      data.sizes,
      n_max,
      epochs=fl.local_epochs,
      batch_size=fl.batch_size,
      seed=config.seed,
      round_index=r,
      pad_to=pad_to,
      aug_key=keys["augment"],
    )
    images, labels = gather(store, jnp.asarray(ids))
    inputs = inputs._replace(
      images=images,
      labels=labels,
      plan=jax.device_put(inputs.plan, cs),
      keys=jax.device_put(inputs.keys, cs),
      weights=jax.device_put(inputs.weights.astype(param_dtype), cs),
    )
    variables, server_state, m = round_fn(state["variables"], state["server_state"], inputs)
    state = {"variables": variables, "server_state": server_state}
    scalars = {
      "train/loss": float(m["train/loss"]),
      "comm/upload_bytes_per_client": upload,
      "comm/upload_bytes_total": upload * len(selected),
    }
    scalars["time/round_s"] = time.perf_counter() - t0
    last = r + 1 == fl.rounds
    if (r + 1) % config.eval.every == 0 or last:
      report = test_report(variables)
      scalars.update(
        {f"test/{k}": report[k] for k in ("top1", "many", "medium", "few") if report[k] is not None}
      )
      if meta["best_top1"] is None or report["top1"] > meta["best_top1"]:
        meta = {"best_top1": report["top1"], "best_round": r + 1}
    writer.write(r + 1, scalars)
    ckpt.save(r + 1, state, meta, force=last)
    bar.set_postfix(
      loss=f"{scalars['train/loss']:.3f}",
      acc=f"{scalars.get('test/top1', float('nan')):.2f}",
      s_per_round=f"{scalars['time/round_s']:.2f}",
    )
  bar.close()
  ckpt.close()
  history = writer.history()
  writer.close()
  if report is None:  # resumed a finished run: evaluate the restored model
    report = test_report(state["variables"])
  _write_outputs(workdir, report, meta, history, data)
  return {"variables": state["variables"], "report": report, "best": meta}


def _write_outputs(workdir, report, meta, history, data) -> None:
  names = data.test.class_names
  print(evaluate.format_report(report, names))
  print(
    f"final round top-1 {report['top1']:.2f}%; best round {meta['best_round']}: "
    f"{meta['best_top1']:.2f}% (best-of-run, labelled as such)"
  )
  if jax.process_index() != 0:
    return
  evaluate.save_confusion_png(report["confusion"], os.path.join(workdir, "confusion.png"), names)
  if history:
    rows = [{"round": r["step"], **r} for r in history]  # metric step = rounds completed
    evaluate.save_curve_png(rows, os.path.join(workdir, "accuracy.png"))
  out = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in report.items()}
  out["best"] = meta
  fileio.atomic_write_text(os.path.join(workdir, "report.json"), json.dumps(out, indent=1))
