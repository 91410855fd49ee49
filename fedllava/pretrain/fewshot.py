"""The pretraining ablation (paper Sec. 4.3.1, Table 4 and Fig. 3) as one command.

  python -m fedllava.pretrain.fewshot --config=configs/cifar10_lt.py:pretrain \\
    --pretrained=workdirs/cifar10_lt_if100_fedavg_pretrain
  python -m fedllava.pretrain.fewshot --config=configs/digits_lt.py:pretrain_demo \\
    --pretrained=workdirs/digits_lt_pretrain_demo          # offline: a mechanics check

Few-shot subsets of the (balanced) training split (``pretrain.fewshot.fractions``: 0.4%, 1%,
2%; stratified, at least one image per class) are trained centrally for ``fewshot.epochs`` (30)
epochs, once from stage 1's backbone (through the stages' handoff, ``stage.start_from``:
pretrained backbone + feature MLP, fresh classifier) and once from scratch, with the same fresh
classifier, data order and augmentation. SGD with momentum, batch ``fewshot.batch_size``, train-
mode BN, stage 2's augmentation; the test split is evaluated after every epoch.

Writes under ``--workdir`` (default ``<pretrained>/fewshot``): ``table4.txt`` (the paper's format:
(epochs to reach ``fewshot.target`` % top-1, best top-1), ``>E`` when never reached),
``fewshot.json`` (every curve) and ``fig3.png`` (accuracy vs epoch, one panel per fraction).
"""

from __future__ import annotations

import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedllava import errors, fileio, predict, rng, sharding, supervised
from fedllava.data import sources

COLUMNS = ("Dataset", "Initialization")
ROWS = ("w/ Pretraining", "w/o Pretraining")


def fractions(config) -> list[float]:
  return [float(x) for x in config.pretrain.fewshot.fractions.split(",") if x]


def column_name(fraction: float) -> str:
  return f"{100 * fraction:g}%"


def subset_indices(labels, fraction: float, num_classes: int, seed: int) -> np.ndarray:
  """A stratified subset: ``max(1, round(fraction * n_c))`` images of each class c, seeded."""
  rs = np.random.RandomState(seed)
  out = []
  for c in range(num_classes):
    pos = np.flatnonzero(labels == c)
    out.append(rs.permutation(pos)[: max(1, int(round(fraction * len(pos))))])
  return np.sort(np.concatenate(out))


def create_epoch_fn(model, num_examples: int, f, mean, std, crop_padding: int, flip: bool):
  """Jitted ``epoch(params, stats, opt, images, labels, key) -> (params, stats, opt, loss)``:
  one shuffled pass in batches (the last padded with weight-0 rows), SGD with momentum, on
  ``supervised.create_epoch_loop`` with its masked cross-entropy and train-mode BN.

    ``L = sum_i w_i CE(y_i, p_i) / max(sum_i w_i, 1)``"""
  tx = optax.sgd(f.learning_rate, momentum=f.momentum or None)

  def loss_fn(params, stats, x, y, w, _):
    out, new = model.apply(
      {"params": params, "batch_stats": stats}, x, train=True, mask=w, mutable=["batch_stats"]
    )
    return supervised.masked_cross_entropy(out["logits"], y, w), (new["batch_stats"], ())

  train = supervised.create_epoch_loop(
    loss_fn,
    tx,
    num_examples=num_examples,
    batch_size=f.batch_size,
    mean=mean,
    std=std,
    crop_padding=crop_padding,
    flip=flip,
    dtype=jnp.float32,
  )

  def epoch(params, stats, opt, images, labels, key):
    (params, stats, opt), (losses, _) = train(params, stats, opt, images, labels, key)
    return params, stats, opt, jnp.mean(losses)

  return jax.jit(epoch), tx


def train_curve(config, fns, variables, train, test, mesh, key) -> list[float]:
  """Test top-1 (%) after each of ``fewshot.epochs`` epochs of central training.

  ``fns``: ``(epoch, tx, predict_fn)`` from ``create_epoch_fn`` and ``predict.create_predict_fn``.
  """
  f = config.pretrain.fewshot
  epoch, tx, predict_fn = fns
  params, stats = variables["params"], variables["batch_stats"]
  opt = tx.init(params)
  images, labels = jnp.asarray(train.images), jnp.asarray(train.labels)
  curve = []
  for e in range(f.epochs):
    params, stats, opt, loss = epoch(params, stats, opt, images, labels, jax.random.fold_in(key, e))
    if not math.isfinite(float(loss)):
      raise errors.DivergedError(f"few-shot training diverged at epoch {e + 1}; lower "
                               "config.pretrain.fewshot.learning_rate.")  # fmt: skip
    v = jax.device_put({"params": params, "batch_stats": stats}, sharding.replicated(mesh))
    preds = predict.predict_all(predict_fn, v, test.images, config.eval.batch_size, mesh)
    curve.append(float(100.0 * np.mean(preds == test.labels)))
  return curve


def summarise(curve, target: float) -> tuple:
  """(first epoch, 1-based, whose top-1 reaches ``target``, or None; best top-1)."""
  reach = next((e + 1 for e, a in enumerate(curve) if a >= target), None)
  return reach, max(curve)


def format_table(dataset: str, results: dict, target: float, epochs: int, label: str = "") -> str:
  """Table 4's layout: rows w/ and w/o pretraining, a column per fraction, cells (epochs, best)."""
  cols = list(next(iter(results.values())))
  cell = lambda r: f"({r[0] if r[0] is not None else f'>{epochs}'}, {r[1]:.2f})"  # noqa: E731
  head = f"{COLUMNS[0]:<10}{COLUMNS[1]:<18}" + "".join(f"{c:>16}" for c in cols)
  lines = [
    f"Table 4: (epochs to reach {target:g}% top-1, highest top-1 in {epochs} epochs)" + label,
    head,
  ]
  for i, row in enumerate(ROWS):
    name = dataset if i == 0 else ""
    lines.append(f"{name:<10}{row:<18}" + "".join(f"{cell(results[row][c]):>16}" for c in cols))
  return "\n".join(lines)


def save_figure(curves: dict, path: str, title: str) -> None:
  """Accuracy vs epoch, w/ and w/o pretraining, one panel per fraction (the paper's Fig. 3)."""
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib.figure import Figure

  cols = list(next(iter(curves.values())))
  fig = Figure(figsize=(4.5 * len(cols), 3.8), dpi=100)
  for i, col in enumerate(cols):
    ax = fig.add_subplot(1, len(cols), i + 1)
    for row in ROWS:
      ys = curves[row][col]
      ax.plot(range(1, len(ys) + 1), ys, marker=".", label=row)
    ax.set_title(f"{title}: {col} of the training set", fontsize=9)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  with fileio.atomic_open(path, "wb") as fh:
    fig.savefig(fh, format="png")


def run(config, pretrained: str, workdir: str | None = None) -> dict:
  """Runs the ablation from the pretrain run in ``pretrained``; returns the summary dict."""
  from fedllava.models import resnet
  from fedllava.pretrain import demo, train
  from fedllava.stage import start_from  # the stages' handoff

  f, d = config.pretrain.fewshot, config.data
  workdir = workdir or os.path.join(pretrained, "fewshot")
  label = ""
  if config.pretrain.demo or config.pretrain.teacher == demo.RANDOM_TINY:
    label = f"\n{demo.LABEL}; backbone pretrained on it"
    print(demo.LABEL)
  backbone = train.load_pretrained(config, pretrained)
  kw = dict(data_dir=d.data_dir, manual_dir=d.manual_dir, image_size=d.image_size)
  kw.update(num_examples=d.synthetic_examples, seed=config.seed)
  full, test = (
    sources.load_dataset(d.name, "train", **kw),
    sources.load_dataset(d.name, "test", **kw),
  )
  model = resnet.create_model(config.model, full.num_classes)
  mesh = sharding.create_client_mesh(config.mesh.num_devices or None)
  root = rng.stream(config.seed, "fewshot")
  fresh = model.init(jax.random.fold_in(root, 0), jnp.zeros((1,) + full.images.shape[1:]))
  inits = {ROWS[0]: start_from(fresh, backbone), ROWS[1]: fresh}
  curves = {row: {} for row in ROWS}
  cells = {row: {} for row in ROWS}
  sizes, compiled = {}, {}
  norm = sources.DATASET_STATS[d.name]
  predict_fn = predict.create_predict_fn(model, norm.mean, norm.std, mesh)
  for frac in fractions(config):
    col = column_name(frac)
    sub = full.subset(subset_indices(full.labels, frac, full.num_classes, config.seed))
    sizes[col] = len(sub)
    if len(sub) not in compiled:  # one compilation per subset size
      compiled[len(sub)] = create_epoch_fn(
        model, len(sub), f, norm.mean, norm.std, d.crop_padding, d.flip
      ) + (predict_fn,)
    for row in ROWS:
      key = jax.random.fold_in(root, 1)  # same order and augmentation for both rows
      curve = train_curve(config, compiled[len(sub)], inits[row], sub, test, mesh, key)
      curves[row][col], cells[row][col] = curve, summarise(curve, f.target)
      print(f"[fewshot] {col} ({len(sub)} images), {row}: best {max(curve):.2f}%")
  table = format_table(d.name, cells, f.target, f.epochs, label)
  print(table)
  out = {
    "dataset": d.name,
    "target": f.target,
    "epochs": f.epochs,
    "subset_sizes": sizes,
    "table": {row: {c: list(v) for c, v in cells[row].items()} for row in ROWS},
    "curves": curves,
    "pretrained": os.path.abspath(pretrained),
    "label": label.strip() or None,
  }
  if jax.process_index() == 0:
    fileio.atomic_write_text(os.path.join(workdir, "table4.txt"), table + "\n")
    fileio.atomic_write_text(os.path.join(workdir, "fewshot.json"), json.dumps(out, indent=1))
    save_figure(curves, os.path.join(workdir, "fig3.png"), d.name)
  return out


def main(argv):
  from absl import flags

  del argv
  cfg = flags.FLAGS.config
  try:
    run(cfg, flags.FLAGS.pretrained, flags.FLAGS.workdir)
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    sys.exit(f"fewshot: {type(e).__name__}: {e}")


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
  flags.DEFINE_string("pretrained", None, "Workdir of a run whose 'pretrain' stage finished.")
  flags.DEFINE_string("workdir", None, "Output folder (default: <pretrained>/fewshot).")
  flags.mark_flags_as_required(["config", "pretrained"])
  app.run(main)
