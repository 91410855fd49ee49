"""Stage 1b, Dynamic Weighted Pretraining (paper Sec. 3.1, Eq. 2; recipe of Sec. 4.1).

The FL model g_fl (backbone + feature MLP) is trained inside the frozen LLaVA-1.5:

    Z = (1 - a(t)) g(x) + a(t) g_fl(x),   loss = next-token CE of LLM(W(Z), caption)    (Eq. 2)

with a(t) a half cosine from 0 to 1 over ``ramp_epochs`` (paper: 2 of 4 epochs), then 1, where
CLIP is no longer computed (``DWPStep.without_clip``). Recipe (Sec. 4.1): 4 epochs, lr 2e-3,
batch 128 (``accum_steps`` micro-batches), AdamW with LLaVA's warm-up + cosine decay. The teacher
(CLIP, projector, LLM) is frozen, held in ``teacher_dtype`` and FSDP-sharded over the ``model``
mesh axis; the batch is split over the same axis; per-layer remat of the LLM is ``remat``.

Data: the previous stage's annotations (``init.outputs``) or ``pretrain.data_json`` +
``pretrain.image_dir`` (LLaVA's ``blip_laion_cc_sbu_558k.json`` / CC-595K ``chat.json``), read and
checked by ``data/llava.py``, batched by grain with fixed shapes (``data/llava_loader.py``).

Writes under its stage directory: ``checkpoints/`` (orbax, every ``checkpoint_every`` steps and the
last), ``metrics.jsonl`` (train/loss, train/alpha, train/grad_norm, perf/images_per_s, perf/mfu
when a peak is known), ``report.json`` (how much of the paper's 4 x 595K pretraining ran). A
killed run resumes from its last checkpoint to the same parameters; a complete one is loaded.

The FL model is built with one class: the classifier is not part of g_fl, gets no gradient and is
not handed over (stage 2 starts its own fresh head, ``stage.start_from``).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from fedllava import checkpoint, errors, metrics, report, rng, sharding
from fedllava.data import registry
from fedllava.models import resnet
from fedllava.pretrain import dwp, teacher
from fedllava.pretrain.config_check import validate  # noqa: F401 (main's validator of the stage)
from fedllava.stage import StageResult

REPORT = "report.json"
PAPER_IMAGES, PAPER_EPOCHS = 595_000, 4  # LLaVA's CC-595K, 4 epochs (Sec. 4.1)
# Dense bf16 peak FLOP/s by device kind (substring, most specific first).
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))


def fl_image_size(config) -> int:
  """The FL backbone's input resolution: ``pretrain.fl_image_size``, else ``data.image_size``,
  else the data set's (``registry.DatasetSpec.image_size``)."""
  if config.pretrain.fl_image_size:
    return int(config.pretrain.fl_image_size)
  if config.data.image_size:
    return int(config.data.image_size)
  return registry.get(config.data.name).image_size


def peak_flops(config) -> Optional[float]:
  """Peak FLOP/s for MFU: ``pretrain.peak_tflops`` if set, else by GPU kind; None otherwise
  (CPU: MFU is recorded as null, there being no meaningful peak)."""
  if config.pretrain.peak_tflops:
    return float(config.pretrain.peak_tflops) * 1e12
  dev = jax.devices()[0]
  if dev.platform != "gpu":
    return None
  kind = getattr(dev, "device_kind", "")
  return next((v for k, v in PEAK_BF16 if k.lower() in kind.lower()), None)


def create_fl_model(config):
  """g_fl as stage 2 builds it (same ``config.model``), with a one-class head that is dropped."""
  return resnet.create_model(config.model, 1)


def _init_state(config, fl_model, tx):
  s = fl_image_size(config)
  key = rng.stream(config.seed, "pretrain/init")
  variables = jax.jit(fl_model.init)(key, jnp.zeros((1, s, s, 3), jnp.float32))
  return dwp.create_dwp_state(variables, tx)


def _as_dict(state: dwp.DWPState) -> dict:
  return {k: getattr(state, k) for k in ("step", "params", "batch_stats", "opt_state")}


def handoff(state: dict) -> dict:
  """Stage 1's output: g_fl's ``params`` (classifier dropped) and ``batch_stats``, on the host."""
  params = {k: v for k, v in state["params"].items() if k not in dwp.FROZEN_FL_PARTS}
  return jax.device_get({"params": params, "batch_stats": state["batch_stats"]})


def _plan(config, num_records: int) -> dict:
  p = config.pretrain
  total = math.ceil(num_records * p.epochs / p.batch_size)
  return {
    "planned_steps": total,
    "steps": min(total, p.max_steps) if p.max_steps else total,
    "ramp_steps": int(round(p.ramp_epochs * num_records / p.batch_size)),
  }


def _records(config, init):
  """(validated records, image root, source JSON) of the pretraining data."""
  from fedllava.data.llava import format_report, read_conversations

  p = config.pretrain
  outputs = init.outputs if init is not None else {}
  if "pretrain_data" in outputs or "annotations" in outputs:
    path = outputs.get("pretrain_data", outputs.get("annotations"))
    root = outputs["image_dir"]
  else:
    path, root = p.data_json, p.image_dir
  records, bad = read_conversations(
    path, root, p.bad_examples, check_images=p.check_images, num_threads=8
  )
  if not records:
    raise ValueError(f"{path}: no usable image-text pair ({format_report(bad)}).")
  return records, root, path, {k: len(v) for k, v in bad.items() if v}


def load_pretrained(config, workdir: str) -> dict:
  """g_fl's variables from a pretrain stage directory (or a run directory holding ``pretrain/``),
  its latest checkpoint; raises ``FileNotFoundError`` when there is none."""
  if os.path.isdir(os.path.join(workdir, "pretrain", "checkpoints")):
    workdir = os.path.join(workdir, "pretrain")
  step, variables = _restore(config, workdir)
  if not step:
    raise errors.MissingInputError(
      f"{workdir} holds no pretraining checkpoint (checkpoints/<step>)."
    )
  return variables


def _restore(config, workdir: str) -> tuple[int, Optional[dict]]:
  """(step, g_fl's variables) of the newest intact checkpoint in ``workdir``; (0, None) if none."""
  fl_model = create_fl_model(config)
  tx = dwp.create_optimizer(config.pretrain.learning_rate, 1)
  like = _as_dict(_init_state(config, fl_model, tx))
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), 1, 1)
  try:
    step, state, _, notes = ckpt.restore_latest(like)
  finally:
    ckpt.close()
  for note in notes:
    print(note)
  return step, (handoff(state) if step else None)


def run(
  config, workdir: str, init: Optional[StageResult] = None, *, started: Optional[Callable] = None
) -> StageResult:
  """Runs (resumes, or loads when complete) Dynamic Weighted Pretraining of g_fl.

  Args:
    config: the run's config (``pretrain``, ``model``, ``data``, ``mesh``, ``seed``).
    workdir: this stage's directory.
    init: the annotate stage's result (its ``outputs`` name the data), or None.
    started: called once the data, teacher and model are built, before this stage writes.
  Returns:
    ``StageResult({"params", "batch_stats"} of g_fl, report)``; the report says how much
    pretraining ran (steps, epochs, images seen, fraction of the paper's 4 x 595K).
  """
  from fedllava.data.llava_loader import make_loader
  from fedllava.models import clip as clip_lib
  from fedllava.pretrain import demo

  p = config.pretrain
  if p.demo:
    print(demo.LABEL)
  fl_model = create_fl_model(config)
  report_path = os.path.join(workdir, REPORT)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if os.path.exists(report_path):  # complete? (no teacher, no data needed to know)
    with open(report_path, encoding="utf-8") as f:
      saved = json.load(f)
    # complete = the step this config plans (pretrain.max_steps may have been raised since) is
    # the one saved, reported and restored intact (a damaged last step falls back: redo it)
    steps = _plan(config, saved["records"])["steps"] if "records" in saved else None
    if steps == saved.get("steps") == checkpoint.latest_saved_round(ckpt_dir):
      step, variables = _restore(config, workdir)
      if step == steps:
        if started is not None:
          started()
        print(f"[pretrain] complete in {workdir} (step {steps}); loaded, not rerun")
        return StageResult(variables, saved)
      print(f"[pretrain] step {steps} could not be restored; redoing it from step {step}")
    elif steps is not None and steps != saved.get("steps"):
      print(f"[pretrain] continuing from step {saved.get('steps')} to step {steps}")

  records, root, source, bad = _records(config, init)
  mesh = sharding.create_model_mesh(config.mesh.num_devices or None)
  if p.teacher == demo.RANDOM_TINY and started is not None:
    started()  # the tiny teacher is written (into this stage's directory) before it is loaded
  llava, teacher_params, tokenizer = teacher.load_sharded(config, workdir, mesh)
  if fl_model.mlp_dim != llava.feature_dim:
    raise errors.ConfigError(
      f"config.model.mlp_dim={fl_model.mlp_dim} must equal the teacher's CLIP feature width "
      f"({llava.feature_dim}) for Eq. 2's blend."
    )
  plan = _plan(config, len(records))
  tx = dwp.create_optimizer(p.learning_rate, plan["planned_steps"], p.warmup_ratio, p.weight_decay)
  step_fn = dwp.DWPStep(llava, fl_model, tx, p.accum_steps, clip_channels_last=True)
  repl = sharding.replicated(mesh)
  state = jax.device_put(_as_dict(_init_state(config, fl_model, tx)), repl)
  ckpt = checkpoint.Checkpointer(ckpt_dir, p.checkpoint_every, p.checkpoint_keep)
  if (ckpt.latest_round() or 0) > plan["steps"]:
    last = ckpt.latest_round()
    ckpt.close()
    raise errors.ConfigError(
      f"{workdir} holds pretraining saved at step {last}, past the {plan['steps']} steps this "
      "config runs (pretrain.epochs / max_steps); use a new --workdir or the old settings."
    )
  done, state, meta, notes = ckpt.restore_latest(state)
  for note in notes:
    print(note)
  meta = meta or {"images_seen": 0}
  size = llava.config.vision_config.image_size
  s_fl = fl_image_size(config)
  norm = registry.get(config.data.name).normalization
  loader = make_loader(
    records,
    root,
    tokenizer,
    template=p.template,
    max_length=p.max_length,
    batch_size=p.batch_size,
    image_size=size,
    num_image_tokens=llava.num_image_tokens,
    seed=config.seed,
    fl_image_size=s_fl,
    num_epochs=p.epochs,
    worker_count=p.worker_count,
    pad_to_square=p.pad_to_square,
    bad_examples=p.bad_examples,
  )
  if p.teacher != demo.RANDOM_TINY and started is not None:
    started()
  if done:
    print(f"[resume] pretrain: restored step {done} from {ckpt_dir}")
  micro = p.batch_size // p.accum_steps
  batch_sharding = sharding.model_batch_sharding(mesh, micro)
  mean = jnp.asarray(norm.mean, jnp.float32)
  std = jnp.asarray(norm.std, jnp.float32)
  prep_clip = jax.jit(lambda x: clip_lib.preprocess(x, size), out_shardings=batch_sharding)
  prep_fl = jax.jit(
    lambda x: (x.astype(jnp.float32) / 255.0 - mean) / std, out_shardings=batch_sharding
  )
  fl_flops = dwp.fl_forward_flops(
    fl_model, {"params": state["params"], "batch_stats": state["batch_stats"]}, (s_fl, s_fl, 3)
  )
  flops = {
    use: dwp.dwp_step_flops(llava, p.batch_size, p.max_length, fl_flops, use)["total"]
    for use in (True, False)
  }
  peak = peak_flops(config)
  print(
    f"[pretrain] DWP (Eq. 2): {len(records)} image-text pairs from {source}; {plan['steps']} "
    f"steps of batch {p.batch_size} ({p.accum_steps} x {micro}), alpha ramps over "
    f"{plan['ramp_steps']} steps; teacher {p.teacher} ({p.teacher_dtype}, over {mesh.size} "
    f"device(s), remat {'on' if p.remat else 'off'}); MFU against "
    + (f"{peak / 1e12:g} TFLOP/s" if peak else "no known peak (recorded as null)")
  )
  writer = metrics.MetricWriter(workdir, resume_step=done, active=jax.process_index() == 0)
  bar = tqdm(total=plan["steps"], initial=done, desc="pretrain", disable=jax.process_index() != 0)
  speeds, mfus = [], []
  t = done
  try:
    for batch in loader.iterate(done):
      if t >= plan["steps"]:
        break
      t0 = time.perf_counter()
      alpha = dwp.alpha_value(t, plan["ramp_steps"])
      dev = {
        k: jax.device_put(np.asarray(batch[k], np.int32), batch_sharding)
        for k in ("input_ids", "labels", "attention_mask", "valid")
      }
      dev["images_fl"] = prep_fl(jax.device_put(batch["fl_images"], batch_sharding))
      if alpha < 1.0:  # a == 1: CLIP's weight is zero, its input is not even prepared
        dev["images_clip"] = prep_clip(jax.device_put(batch["images"], batch_sharding))
      new, m = step_fn(dwp.DWPState(**state), teacher_params, dev, alpha)
      loss = float(m["loss"])  # waits for the step
      seconds = time.perf_counter() - t0
      if not math.isfinite(loss):
        ckpt.close()
        raise errors.DivergedError(
          f"pretraining step {t + 1}: the loss is {loss}; nothing of this step was saved and the "
          f"last checkpoint (step {ckpt.latest_round() or 'none'}) is intact. Lower "
          "config.pretrain.learning_rate and rerun."
        )
      # keep the state replicated: the same input shardings every step and after a restore, so
      # each step variant compiles once and a resumed run runs the very same programs
      state, t = jax.device_put(_as_dict(new), repl), t + 1
      n_img = int(np.sum(batch["valid"]))
      meta = {"images_seen": meta["images_seen"] + n_img}
      scalars = {
        "train/loss": loss,
        "train/alpha": alpha,
        "train/grad_norm": float(m["grad_norm"]),
        "perf/images_per_s": n_img / seconds,
        "perf/step_s": seconds,
      }
      if peak:
        scalars["perf/mfu"] = dwp.mfu(flops[alpha < 1.0], seconds, peak)
        mfus.append(scalars["perf/mfu"])
      speeds.append(scalars["perf/images_per_s"])
      writer.write(t, scalars)
      ckpt.save(t, state, meta, force=t == plan["steps"])
      bar.update(1)
      bar.set_postfix(loss=f"{loss:.3f}", alpha=f"{alpha:.2f}", img_s=f"{speeds[-1]:.1f}")
    history = writer.history()
  finally:
    bar.close()
    writer.close()
    ckpt.close()
  if t < plan["steps"]:
    raise RuntimeError(f"the data loader ended at step {t} of {plan['steps']}.")
  out = _report(config, plan, meta["images_seen"], len(records), source, bad, history)
  # steady-state speed of this run (the first step compiles); MFU null without a known peak
  out["images_per_s"] = statistics.median(speeds[1:] or speeds) if speeds else None
  out["mfu"] = statistics.median(mfus[1:] or mfus) if mfus else None
  out["peak_flops"] = peak
  out["step_flops"] = {"alpha_below_1": flops[True], "alpha_1": flops[False]}
  out["unreadable_while_loading"] = len(loader.report["unreadable_image"])
  if jax.process_index() == 0:
    report.write_json(report_path, out)
  print(
    f"[pretrain] ran {out['steps']} steps = {out['epochs']:.2f} epochs over {len(records)} pairs,"
    f" {out['images_seen']} images seen = {100 * out['fraction_of_paper']:.4f}% of the paper's "
    f"4 x 595K; final loss {out['final_loss']}"
  )
  return StageResult(handoff(state), out)


def _report(config, plan, images_seen, num_records, source, bad, history) -> dict:
  from fedllava.pretrain import demo

  p = config.pretrain
  losses = [r["train/loss"] for r in history if "train/loss" in r]
  out = {
    **plan,
    "epochs": images_seen / num_records,  # valid rows only: a placeholder is no image seen
    "planned_epochs": p.epochs,
    "records": num_records,
    "images_seen": int(images_seen),
    "fraction_of_paper": images_seen / (PAPER_EPOCHS * PAPER_IMAGES),
    "paper_recipe": "LLaVA v1 CC-595K, 4 epochs (2 ramping alpha), lr 2e-3, batch 128",
    "teacher": p.teacher,
    "data": source,
    "template": p.template,
    "batch_size": p.batch_size,
    "accum_steps": p.accum_steps,
    "bad_examples": bad,
    "first_loss": losses[0] if losses else None,
    "final_loss": losses[-1] if losses else None,
  }
  if p.demo:
    out["demo"] = demo.LABEL
  return out
