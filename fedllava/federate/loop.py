"""Stage 2, federated finetuning (paper Sec. 3.2): the round loop around ``rounds.py``.

``run(config, workdir, init=None, after_round=None)`` builds the long-tailed federated data,
initialises the global model (from ``init``, stage 1's pretrained backbone, when given),
restores the last checkpoint if there is one, and for each round samples clients, runs one
jitted sharded round, applies ``after_round`` (stage 3's per-round alignment, built by
``main.py``: this stage never imports another) and evaluates on the balanced test set.

It writes, under its stage directory ``workdir``: ``client_histogram.csv``, ``metrics.jsonl`` /
``metrics.csv`` / ``tb/``, ``checkpoints/``, ``report.json``, ``confusion.png`` and
``accuracy.png``. A stage whose final checkpoint and report exist is loaded, not rerun.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from tqdm import tqdm

from fedllava import (
  accounting,
  algorithms,
  checkpoint,
  errors,
  metrics,
  report,
  rng,
  sharding,
  supervised,
  zero_shot,
)
from fedllava.data import classnames, federated, partition
from fedllava.federate import client, rounds
from fedllava.models import resnet
from fedllava.stage import StageResult, start_from

REPORT = "report.json"
RoundHook = Callable[[int, dict], dict]  # (rounds completed, variables) -> variables


def validate(config) -> None:
  """Checks ``config.fl``, ``config.eval`` and ``config.checkpoint`` before anything runs.

  Raises:
    ValueError: naming the field and the fix.
  """
  fl = config.fl
  algorithms.create(fl)  # unknown algorithm -> clear error
  if fl.num_clients < 1:
    raise errors.ConfigError(f"config.fl.num_clients={fl.num_clients} must be >= 1.")
  if not 1 <= fl.clients_per_round <= fl.num_clients:
    raise errors.ConfigError(
      f"config.fl.clients_per_round={fl.clients_per_round} must be between 1 "
      f"and config.fl.num_clients={fl.num_clients}."
    )
  for field in ("rounds", "local_epochs", "batch_size"):
    if fl[field] < 1:
      raise errors.ConfigError(f"config.fl.{field}={fl[field]} must be >= 1.")
  if fl.group_size < 0:
    raise errors.ConfigError(
      f"config.fl.group_size={fl.group_size} must be >= 1, or 0 for auto (the largest chunk of "
      "clients that fits the device's memory)."
    )
  for field in ("learning_rate", "server_lr"):
    if not (fl[field] > 0 and math.isfinite(fl[field])):
      raise errors.ConfigError(
        f"config.fl.{field}={fl[field]} must be a finite number > 0 (CReFF: learning_rate "
        "0.1, server_lr 1.0)."
      )
  if not (fl.prox_mu >= 0 and math.isfinite(fl.prox_mu)):
    raise errors.ConfigError(f"config.fl.prox_mu={fl.prox_mu} must be a finite number >= 0.")
  if not (0 <= fl.server_momentum < 1):
    raise errors.ConfigError(f"config.fl.server_momentum={fl.server_momentum} must be in [0, 1).")
  if fl.client_parallelism not in ("auto",) + rounds.STRATEGIES:
    raise errors.ConfigError(
      f"config.fl.client_parallelism={fl.client_parallelism!r}; choose 'auto' (what the "
      f"benchmark measured fastest on this backend) or one of {rounds.STRATEGIES}."
    )
  if rounds.resolve_strategy(fl.client_parallelism) == "group" and fl.group_size:
    devices = config.mesh.num_devices or jax.device_count()
    per_device = -(-fl.clients_per_round // devices)
    if per_device % fl.group_size:
      raise errors.ConfigError(
        f"config.fl.group_size={fl.group_size} must divide the clients per device "
        f"({fl.clients_per_round} clients per round over {devices} devices = {per_device}); "
        f"pick a divisor of {per_device}."
      )
  if config.eval.every < 1:
    raise errors.ConfigError(
      f"config.eval.every={config.eval.every} must be >= 1 (rounds between tests)."
    )
  if config.eval.batch_size < 1:
    raise errors.ConfigError(f"config.eval.batch_size={config.eval.batch_size} must be >= 1.")
  if config.checkpoint.every < 1 or config.checkpoint.keep < 1:
    raise errors.ConfigError("config.checkpoint.every and config.checkpoint.keep must be >= 1.")


def _named_keys(seed: int) -> dict:
  return {name: rng.stream(seed, f"federate/{name}") for name in ("init", "augment")}


def is_complete(workdir: str, config) -> bool:
  """Whether this stage finished in ``workdir`` (its last round is saved and reported)."""
  if not os.path.exists(os.path.join(workdir, REPORT)):
    return False
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), 1, config.checkpoint.keep)
  try:
    return ckpt.latest_round() == config.fl.rounds
  finally:
    ckpt.close()


def run(
  config,
  workdir: str,
  init: Optional[StageResult] = None,
  *,
  after_round: Optional[RoundHook] = None,
  started: Optional[Callable[[], None]] = None,
  make_round_fn: Optional[Callable] = None,
) -> StageResult:
  """Runs (or resumes, or loads when complete) federated finetuning.

  Args:
    config: the run's config (``data``, ``model``, ``fl``, ``eval``, ``checkpoint``, ``mesh``).
    workdir: this stage's directory.
    init: the previous stage's result; its variables initialise the backbone (``start_from``).
    after_round: called after every aggregation with (rounds completed, variables); its
      result is the global model clients receive next round (stage 3, ``align.when =
      "every_round"``). It must be deterministic, so a resumed run replays it exactly.
    started: called once the data and model are built, before this stage writes anything.
    make_round_fn: builds the round function (default ``rounds.create_round_fn``, same
      arguments); ``multirun.py`` passes one that runs this run's round in one program with
      other runs' rounds.
  Returns:
    ``StageResult(variables, report)``; ``report`` holds ``final`` (the last round's test
    report), ``best`` and ``curve`` (``[(round, top1)]``).
  """
  d, fl = config.data, config.fl
  complete = is_complete(workdir, config)
  algo = algorithms.create(fl)
  uses_clip = algo.side_data == "teacher_logits" or algo.server_data == "class_text_embeddings"
  if uses_clip:
    zero_shot._require_teacher(config, algo.name)
  data = federated.build(config, unlabeled=algo.server_data == "unlabeled")
  mesh = sharding.create_client_mesh(config.mesh.num_devices or None)
  model = resnet.create_model(config.model, data.num_classes)
  keys = _named_keys(config.seed)
  variables = model.init(keys["init"], jnp.zeros((1,) + data.images.shape[2:], jnp.float32))
  if init is not None and init.variables is not None:
    variables = start_from(variables, init.variables)
  server_key = rng.stream(config.seed, "federate/server")
  state = {
    "variables": variables,
    "server_state": algorithms.base.init_server_state(
      algo, variables, data.num_classes, server_key
    ),
  }
  repl = sharding.replicated(mesh)
  test_report = supervised.create_test_evaluator(
    model, data.norm, data.test, mesh, config.eval.batch_size, data.num_classes, data.class_counts
  )

  ckpt = checkpoint.Checkpointer(
    os.path.join(workdir, "checkpoints"), config.checkpoint.every, config.checkpoint.keep
  )
  if (ckpt.latest_round() or 0) > fl.rounds:
    done = ckpt.latest_round()
    ckpt.close()
    raise errors.ConfigError(
      f"{workdir} holds a run finished at round {done}, past config.fl.rounds={fl.rounds}; "
      f"reporting its round-{done} model as round {fl.rounds}'s would be wrong. Set "
      f"--config.fl.rounds={done} (or more), or use a new --workdir."
    )
  done, state, meta, notes = ckpt.restore_latest(state)
  for note in notes:
    print(note)
  meta = meta or {"best_top1": None, "best_round": None, "scalars": None}
  complete = complete and done == fl.rounds
  state = jax.device_put(state, repl)
  if started is not None:
    started()
  if complete:  # loaded, not rerun: nothing is rewritten
    ckpt.close()
    with open(os.path.join(workdir, REPORT)) as f:
      saved = json.load(f)
    print(f"[federate] complete in {workdir} (round {done}); loaded, not rerun")
    return StageResult(state["variables"], saved)
  if done:
    print(f"[resume] federate: restored round {done} from {workdir}/checkpoints")

  held = len(data.align_indices)
  print(
    f"[data] {d.name}: training pool of {len(data.train)} long-tailed images "
    f"(IF={d.imbalance_factor:g}) over {fl.num_clients} clients, {len(data.test)} test images, "
    + (f"{held} held out for D_align" if held else "none held out for D_align")
  )
  print(partition.format_histogram(data.histogram))
  partition.save_histogram(data.histogram, os.path.join(workdir, "client_histogram.csv"))

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
  strategy = rounds.resolve_strategy(fl.client_parallelism)
  print(f"[fl] client parallelism: {fl.client_parallelism} -> {strategy} ({jax.default_backend()})")
  print(f"[fl] convolutions: {config.model.get('conv_impl', 'auto')} -> {model.conv_impl}")
  make_round_fn = make_round_fn or rounds.create_round_fn
  round_fn = make_round_fn(trainer, algo, mesh, strategy, fl.group_size)

  cs = sharding.client_sharding(mesh)
  if d.placement == "device":  # the whole client store lives on device for the run
    store = jax.device_put((data.images, data.labels), repl)
    gather = jax.jit(lambda s, ids: (s[0][ids], s[1][ids]), out_shardings=(cs, cs))
  else:
    store = (data.images, data.labels)
    gather = lambda s, ids: jax.device_put((s[0][ids], s[1][ids]), cs)  # noqa: E731
  server_images = None
  if algo.server_data == "unlabeled":  # FedDF, FedBE: the images the long tail left out
    server_images = jax.device_put(data.unlabeled_images(), repl)
  elif algo.server_data == "labeled_balanced":  # Ratio Loss: the monitor's labelled images
    server_images = jax.device_put(data.labeled_server_data(), repl)
  side_store = None
  if uses_clip:  # CLIP2FL: CLIP's zero-shot logits of every client image, its class texts
    side_store, text_emb = _clip_side_data(config, algo.name, data, workdir)
    if algo.server_data == "class_text_embeddings":
      server_images = jax.device_put(text_emb, repl)
    if algo.side_data is None:
      side_store = None
    elif d.placement == "device":
      side_store = jax.device_put(side_store, repl)
  pad_to = sharding.pad_to_multiple(fl.clients_per_round, mesh)
  n_max = data.images.shape[1]
  param_dtype = jax.tree.leaves(state["variables"]["params"])[0].dtype
  uploads = rounds.upload_bytes_by_kind(
    trainer, algo, state["variables"], data.images[0], state["server_state"]
  )
  upload = sum(uploads.values())
  extra = ", ".join(
    f"{v / 2**20:.3f} MiB of {k}" for k, v in uploads.items() if v and k != "parameters"
  )
  print(
    f"[fl] {algo.name}: {fl.clients_per_round} of {fl.num_clients} clients per round, "
    f"{fl.local_epochs} local epochs, batch {fl.batch_size}; each client uploads "
    f"{uploads['parameters'] / 2**20:.2f} MiB of parameters + BN statistics"
    + (f" and {extra}" if extra else "")
    + f" per round; {mesh.size} device(s)"
    + ("; aligned after every round" if after_round is not None else "")
  )

  accountant = accounting.accountant_from_config(fl)
  stop = fl.rounds
  if accountant is not None:
    stop = accounting.plan(fl, accountant, done)

  writer = metrics.MetricWriter(workdir, resume_step=done, active=jax.process_index() == 0)
  if done and meta.get("scalars") and done not in {r["step"] for r in writer.history()}:
    writer.write(done, meta["scalars"])  # a torn last line at the checkpoint's own round
  final = None
  bar = tqdm(
    range(done, stop),
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
    if side_store is not None:
      inputs = inputs._replace(side=jax.device_put(side_store[ids], cs))
    inputs = inputs._replace(
      images=images,
      labels=labels,
      plan=jax.device_put(inputs.plan, cs),
      keys=jax.device_put(inputs.keys, cs),
      weights=jax.device_put(inputs.weights.astype(param_dtype), cs),
      sizes=jax.device_put(inputs.sizes, cs),
    )
    server_inputs = {"data": server_images, "key": jax.random.fold_in(server_key, r)}
    variables, server_state, m = round_fn(
      state["variables"], state["server_state"], inputs, server_inputs
    )
    if r == done and fl.client_parallelism in ("group", "chunked"):
      _print_group_size(round_fn, mesh.size)
    if not bool(m["finite"]):
      _diverged(r + 1, variables, ckpt, writer)
    if after_round is not None:
      variables = after_round(r + 1, variables)
      if not bool(rounds.all_finite(variables)):
        _diverged(r + 1, variables, ckpt, writer, where="after alignment")
    state = {"variables": variables, "server_state": server_state}
    scalars = {
      "train/loss": float(m["train/loss"]),
      "comm/upload_bytes_per_client": upload,
      "comm/upload_bytes_total": upload * len(selected),
      **{f"comm/upload_bytes_per_client/{k}": v for k, v in uploads.items()},
      **{k: float(v) for k, v in m.items() if k.startswith(("server/", "dp/"))},
    }
    if accountant is not None:
      scalars["dp/epsilon"] = accountant.epsilon(r + 1)
    scalars["time/round_s"] = time.perf_counter() - t0
    last = r + 1 == stop  # the last round, or the last within config.fl.dp.epsilon_budget
    if (r + 1) % config.eval.every == 0 or last:
      final = test_report(algorithms.base.evaluated(algo, variables, server_state))
      scalars.update(
        {f"test/{k}": final[k] for k in ("top1", "many", "medium", "few") if final[k] is not None}
      )
      if meta["best_top1"] is None or final["top1"] > meta["best_top1"]:
        meta = {"best_top1": final["top1"], "best_round": r + 1}
    meta = {**meta, "scalars": scalars}
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
  if final is None:  # resumed at the last round: evaluate the restored model
    final = test_report(algorithms.base.evaluated(algo, state["variables"], state["server_state"]))
  pool = {"train_pool_size": len(data.train), "d_align_held_out": len(data.align_indices)}
  if accountant is not None:
    pool["dp"] = accounting.report(fl, accountant, stop)
  out = _write_outputs(workdir, final, meta, history, data.test.class_names, pool)
  return StageResult(state["variables"], out)


def _print_group_size(round_fn, num_devices: int) -> None:
  info = getattr(round_fn, "info", {})
  if "budget_bytes" not in info:
    return
  tqdm.write(
    f"[fl] group_size auto: {info['group_size']} clients per chunk "
    f"({info['per_client_bytes'] / 2**20:.1f} MiB each, {info['fixed_bytes'] / 2**20:.1f} MiB "
    f"fixed; {info['memory_fraction']:g} of {info['budget_bytes'] / 2**30:.2f} GiB free per "
    f"device, {info['budget_source']}; {num_devices} device(s))"
  )


def _diverged(round_index, variables, ckpt, writer, where="after aggregation"):
  leaf = rounds.first_nonfinite_leaf(variables)
  last = ckpt.latest_round()
  ckpt.close()
  writer.close()
  raise errors.DivergedError(
    f"round {round_index}: the global model holds a non-finite value {where} (first: "
    f"{leaf}); this state was not saved and the last checkpoint "
    f"({'round ' + str(last) if last else 'none yet'}) is intact. Lower "
    "config.fl.learning_rate (or config.fl.server_lr / config.align.learning_rate) and rerun."
  )


def _write_outputs(workdir, final, meta, history, names, pool) -> dict:
  """Prints and writes the report; ``pool``: the training pool's size and D_align's hold-out."""
  print(report.format_report(final, names))
  print(
    f"final round top-1 {final['top1']:.2f}%; best round {meta['best_round']}: "
    f"{meta['best_top1']:.2f}% (best-of-run, labelled as such)"
  )
  curve = [(r["step"], r["test/top1"]) for r in history if "test/top1" in r]
  out = {
    "final": report.to_jsonable(final),
    "best": {"best_top1": meta["best_top1"], "best_round": meta["best_round"]},
    "curve": curve,
    "class_names": list(names) if names else None,
    **pool,
  }
  if jax.process_index() != 0:
    return out
  report.save_confusion_png(final["confusion"], os.path.join(workdir, "confusion.png"), names)
  if history:
    rows = [{"round": r["step"], **r} for r in history]  # metric step = rounds completed
    report.save_curve_png(rows, os.path.join(workdir, "accuracy.png"))
  report.write_json(os.path.join(workdir, REPORT), out)
  return out


def _clip_side_data(config, method: str, data, workdir: str):
  """``(teacher logits [K, N_max, C], class text embeddings [C, D])`` for a method that
  distills CLIP (``side_data="teacher_logits"``), with the prompts ``config.fl.<method>.templates``
  and the data set's readable class names; cached in ``config.align.cache_dir`` (or workdir)."""
  try:
    names = classnames.get_classnames(config.data.name)
  except ValueError as e:
    raise errors.ConfigError(
      f"config.fl.algorithm={method!r} prompts CLIP with readable class names and "
      f"config.data.name={config.data.name!r} has none ({e})."
    ) from None
  if len(names) != data.num_classes:
    raise errors.ConfigError(
      f"config.data.name={config.data.name!r} has {data.num_classes} classes but "
      f"{len(names)} readable class names."
    )
  cache = config.align.cache_dir or os.path.join(workdir, "teacher")
  return zero_shot.client_teacher_logits(
    config, data.images, names, config.fl[method].templates, cache, method=method
  )
