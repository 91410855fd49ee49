"""Teacher (LLaVA-1.5) step speed: forward, and forward + backward to the visual features (DWP).

    python benchmarks/teacher_step.py --size=7b --batch=1,4,8,16
    python benchmarks/teacher_step.py --size=tiny            # CPU smoke run (seconds)

Weights are random bf16 made directly on the device (a jitted init; no host copy of 7B floats).
Inputs: 576 image tokens (features before the projector, as stage 1 blends them) + 64 text tokens.
Measured per batch size:
  clip_forward   g(x): CLIP ViT-L/14-336 features of the images (stage 1 while alpha < 1)
  llm_forward    projector + LLM + lm_head logits (forward_from_features)
  dwp_grad       value and gradient of the next-token loss w.r.t. the visual features only,
                 with per-layer remat on and off (off may run out of memory: recorded as oom)
  dwp_step_alpha_lt1 / dwp_step_alpha1
                 the full DWP step of fedllava/pretrain/dwp.py (DWPStep, Eq. 2): CLIP (a < 1
                 only) + g_fl (ResNet-8 + feature MLP on 32 px images, --dwp_width) + blend +
                 projector + LLM + backward to g_fl + AdamW, per-layer remat on, at --dwp_batch
                 (7b: 8, 16, 32); images/s and MFU (dwp.dwp_step_flops: LLM 4PT, CLIP 2PT while
                 a < 1, g_fl 3x its forward)

    python benchmarks/teacher_step.py --size=7b --skip_clip --skip_forward --remat=on \
      --dwp_batch=8,16,32                                   # the DWP step only

FLOPs (written to the JSON as well), with P = matmul parameters on the path (projector + LLM
decoder + lm_head, no embedding table; CLIP's for clip_forward) and T = batch x tokens:
  forward              F = 2 P T
  forward + grad to inputs only:  F + 2 P T = 4 P T   (each linear's dx = dy W^T costs as much as its
                       forward; the weight gradients dW are never formed since the teacher is frozen;
                       remat's recomputed forward is not counted: hardware does 6 P T)
  attention (reported separately, not in MFU): full T x T scores, 4 L S^2 d per sequence forward,
                       twice that again for the input gradient.
MFU = model FLOPs / step time / peak dense bf16 FLOP/s (H100 SXM and H200: 989e12; H100 PCIe 756e12).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fedllava.models.llava import LlavaModel, memory_estimate, next_token_loss  # noqa: E402
from fedllava.models.llava_configs import llava_config  # noqa: E402

TEXT_TOKENS = {"tiny": 8, "7b": 64}  # text tokens after the image tokens, per --size
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12))


def matmul_params(shapes, part: str) -> int:
  """Parameters that take part in matmuls (kernels) under params[part]; embedding tables excluded."""
  flat = jax.tree_util.tree_flatten_with_path(shapes[part])[0]
  return int(
    sum(math.prod(s.shape) for path, s in flat if str(getattr(path[-1], "key", "")) == "kernel")
  )


def peak_flops(kind: str):
  for name, peak in PEAK_BF16:
    if name.lower() in kind.lower():
      return peak
  return None


def is_oom(err: Exception) -> bool:
  s = str(err)
  return "RESOURCE_EXHAUSTED" in s or "Out of memory" in s or "out of memory" in s.lower()


def time_compiled(fn, args, iters: int):
  """AOT-compile, warm up once, then time `iters` calls with block_until_ready."""
  t0 = time.perf_counter()
  lowered = jax.jit(fn).lower(*args)
  print(f"  lowered in {time.perf_counter() - t0:.1f}s; compiling", flush=True)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  print(f"  compiled in {compile_s:.1f}s; running", flush=True)
  mem = None
  try:
    ma = compiled.memory_analysis()
    if ma is not None:
      mem = {
        "temp_bytes": int(ma.temp_size_in_bytes),
        "argument_bytes": int(ma.argument_size_in_bytes),
        "output_bytes": int(ma.output_size_in_bytes),
      }
  except Exception:  # noqa: BLE001 - not every backend reports it
    pass
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t)
  return {
    "compile_s": compile_s,
    "step_s_median": statistics.median(times),
    "step_s_min": min(times),
    "step_s_all": times,
    "memory": mem,
  }


def run_one(name, fn, args, iters, tokens, flops, attn_flops, peak):
  print(f"{name}: {tokens} tokens", flush=True)
  rec = {"name": name, "tokens": tokens, "model_flops": flops, "attention_flops": attn_flops}
  try:
    rec.update(time_compiled(fn, args, iters))
  except Exception as e:  # noqa: BLE001 - record OOM / failures, keep going
    rec.update({"oom": is_oom(e), "error": f"{type(e).__name__}: {str(e)[:500]}"})
    return rec
  step = rec["step_s_median"]
  rec["tokens_per_s"] = tokens / step
  rec["model_tflops_per_s"] = flops / step / 1e12
  if peak:
    rec["mfu"] = flops / step / peak
    rec["mfu_with_attention"] = (flops + attn_flops) / step / peak
  return rec


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--size", default="tiny", choices=sorted(TEXT_TOKENS))
  ap.add_argument(
    "--batch", default=None, help="comma list of batch sizes (default 1,4,8,16; tiny: 1,2)"
  )
  ap.add_argument("--iters", type=int, default=5)
  ap.add_argument("--remat", default="on,off", help="which remat settings to time for dwp_grad")
  ap.add_argument("--skip_clip", action="store_true")
  ap.add_argument("--skip_forward", action="store_true", help="time only the DWP gradient")
  ap.add_argument(
    "--dwp_batch", default=None, help="batch sizes of the full DWP step (default 8,16,32; tiny: 2)"
  )
  ap.add_argument("--dwp_width", type=int, default=None, help="g_fl width (7b: 64, tiny: 8)")
  ap.add_argument("--skip_dwp", action="store_true", help="skip the full DWP step")
  ap.add_argument(
    "--out", default=None, help="JSON path (default benchmarks/results/teacher_step_<device>.json)"
  )
  args = ap.parse_args(argv)

  config, n_text = llava_config(args.size), TEXT_TOKENS[args.size]
  batches = [
    int(b) for b in (args.batch or ("1,2" if args.size == "tiny" else "1,4,8,16")).split(",")
  ]
  dev = jax.devices()[0]
  kind = getattr(dev, "device_kind", dev.platform)
  peak = peak_flops(kind) if dev.platform == "gpu" else None
  tag = dev.platform if dev.platform == "cpu" else kind.replace("NVIDIA ", "").split()[0].lower()
  out_path = args.out or os.path.join(
    os.path.dirname(os.path.abspath(__file__)),
    "results",
    f"teacher_step_{tag}{'' if args.size == '7b' else '_' + args.size}.json",
  )

  models = {r: LlavaModel(config, dtype=jnp.bfloat16, remat=(r == "on")) for r in ("on", "off")}
  base = models["off"]
  shapes = base.param_shapes()
  print(memory_estimate(shapes, jnp.bfloat16), flush=True)
  with jax.default_device(dev):
    params = base.random_params(jax.random.PRNGKey(0), jnp.bfloat16)
  jax.block_until_ready(params)

  vc, tc = config.vision_config, config.text_config
  n_img = base.num_image_tokens
  seq = n_img + n_text
  p_llm = matmul_params(shapes, "language_model") + matmul_params(shapes, "multi_modal_projector")
  p_clip = (
    matmul_params(shapes, "vision_tower") * (max(base.feature_layers)) // vc.num_hidden_layers
  )
  hd = tc.hidden_size
  results = {
    "size": args.size,
    "device_kind": kind,
    "platform": dev.platform,
    "device_count": jax.device_count(),
    "jax_version": jax.__version__,
    "peak_bf16_flops": peak,
    "image_tokens": n_img,
    "text_tokens": n_text,
    "llm_matmul_params": p_llm,
    "clip_matmul_params_used": p_clip,
    "flops_formula": {
      "forward": "2*P*T",
      "forward_plus_input_grad": "4*P*T (no dW; remat recompute not counted)",
      "attention_forward": "4*L*S^2*d per sequence (full matrix)",
      "attention_input_grad": "2x attention_forward",
    },
    "runs": [],
  }

  def save():
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
      json.dump(results, f, indent=1)

  def record(rec, **extra):  # after every measurement, so a run cut short keeps its results
    results["runs"].append({**extra, **rec})
    shown = {k: v for k, v in rec.items() if k != "step_s_all"}
    print(json.dumps({**extra, **shown}), flush=True)
    save()

  rng = np.random.RandomState(0)
  for b in batches:
    ids = np.concatenate(
      [
        np.full((b, n_img), config.image_token_index),
        rng.randint(3, min(tc.vocab_size, 32000), (b, n_text)),
      ],
      axis=1,
    ).astype(np.int32)
    ids, mask = jnp.asarray(ids), jnp.ones((b, seq), jnp.int32)
    labels = jnp.where(ids == config.image_token_index, -100, ids)
    feats = jax.random.normal(jax.random.PRNGKey(b), (b, n_img, base.feature_dim), jnp.bfloat16)
    tokens = b * seq
    attn_fwd = 4 * tc.num_hidden_layers * seq * seq * hd * b
    if not args.skip_clip:
      pix = jax.random.normal(
        jax.random.PRNGKey(1), (b, 3, vc.image_size, vc.image_size), jnp.bfloat16
      )
      vs = n_img + 1
      clip_attn = 4 * max(base.feature_layers) * vs * vs * vc.hidden_size * b
      rec = run_one(
        "clip_forward",
        lambda p, x: base.image_features(p, x),
        (params, pix),
        args.iters,
        b * vs,
        2 * p_clip * b * vs,
        clip_attn,
        peak,
      )
      record(rec, batch=b)

    def fwd(p, f, i, m, model=base):
      return model.forward_from_features(p, f, i, m)

    if not args.skip_forward:
      rec = run_one(
        "llm_forward",
        fwd,
        (params, feats, ids, mask),
        args.iters,
        tokens,
        2 * p_llm * tokens,
        attn_fwd,
        peak,
      )
      record(rec, batch=b)
    for r in args.remat.split(","):
      model = models[r]

      def dwp(p, f, i, m, y, model=model):
        return jax.value_and_grad(
          lambda z: next_token_loss(model.forward_from_features(p, z, i, m), y)
        )(f)

      rec = run_one(
        f"dwp_grad_remat_{r}",
        dwp,
        (params, feats, ids, mask, labels),
        args.iters,
        tokens,
        4 * p_llm * tokens,
        3 * attn_fwd,
        peak,
      )
      record(rec, batch=b, remat=r == "on")

  if not args.skip_dwp:
    dwp_batches = args.dwp_batch or ("2" if args.size == "tiny" else "8,16,32")
    for b in [int(x) for x in dwp_batches.split(",")]:
      for rec in dwp_step_runs(config, params, b, n_text, args, peak):
        record(rec, batch=b, remat=True)
  save()
  print(f"wrote {out_path}")
  return results


def dwp_step_runs(config, params, batch: int, n_text: int, args, peak):
  """The full DWP step (``dwp.DWPStep``) at a < 1 (with CLIP) and a = 1 (without), timed."""
  import optax

  from fedllava.models import resnet
  from fedllava.pretrain import dwp

  llava = LlavaModel(config, dtype=jnp.bfloat16, remat=True)
  vc, tc = config.vision_config, config.text_config
  width = args.dwp_width or (64 if args.size == "7b" else 8)
  fl_px = 32
  fl = resnet.ResNet(
    (1, 1, 1), resnet.BasicBlock, width, 10, "cifar", mlp_dim=llava.feature_dim, conv_impl="xla"
  )
  variables = jax.jit(fl.init)(jax.random.PRNGKey(2), jnp.zeros((1, fl_px, fl_px, 3)))
  tx = optax.adamw(2e-3)
  step = dwp.DWPStep(llava, fl, tx, accum_steps=1, clip_channels_last=True)
  n_img = llava.num_image_tokens
  seq = n_img + n_text
  rng = np.random.RandomState(batch)
  ids = np.concatenate(
    [
      np.full((batch, n_img), config.image_token_index),
      rng.randint(3, min(tc.vocab_size, 32000), (batch, n_text)),
    ],
    1,
  ).astype(np.int32)
  data = {
    "images_clip": jax.random.normal(
      jax.random.PRNGKey(3), (batch, vc.image_size, vc.image_size, 3), jnp.float32
    ),
    "images_fl": jax.random.normal(jax.random.PRNGKey(4), (batch, fl_px, fl_px, 3), jnp.float32),
    "input_ids": jnp.asarray(ids),
    "labels": jnp.asarray(np.where(ids == config.image_token_index, -100, ids)),
    "attention_mask": jnp.ones((batch, seq), jnp.int32),
    "valid": jnp.ones((batch,), jnp.int32),
  }
  fl_flops = dwp.fl_forward_flops(fl, variables, (fl_px, fl_px, 3))
  out = []
  for name, use_clip in (("dwp_step_alpha_lt1", True), ("dwp_step_alpha1", False)):
    flops = dwp.dwp_step_flops(llava, batch, seq, fl_flops, use_clip)
    rec = {
      "name": name,
      "tokens": batch * seq,
      "images": batch,
      "model_flops": flops["total"],
      "flops_parts": flops,
      "attention_flops": flops["attention"],
      "fl_width": width,
    }
    print(f"{name}: batch {batch}", flush=True)
    try:
      state = dwp.create_dwp_state(variables, tx)
      if use_clip:
        fn, extra = step.with_clip, (jnp.float32(0.5),)
        b = data
      else:
        fn, extra = step.without_clip, ()
        b = {k: v for k, v in data.items() if k != "images_clip"}
      t0 = time.perf_counter()
      compiled = fn.lower(state, params, b, *extra).compile()
      rec["compile_s"] = time.perf_counter() - t0
      state, m = compiled(state, params, b, *extra)
      jax.block_until_ready(m["loss"])
      times = []
      for _ in range(args.iters):
        t = time.perf_counter()
        state, m = compiled(state, params, b, *extra)
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t)
    except Exception as e:  # noqa: BLE001 - record OOM / failures, keep going
      rec.update({"oom": is_oom(e), "error": f"{type(e).__name__}: {str(e)[:500]}"})
      out.append(rec)
      continue
    s = statistics.median(times)
    rec.update(
      step_s_median=s,
      step_s_min=min(times),
      step_s_all=times,
      tokens_per_s=batch * seq / s,
      images_per_s=batch / s,
      model_tflops_per_s=flops["total"] / s / 1e12,
      mfu=dwp.mfu(flops["total"], s, peak) if peak else None,
      loss=float(m["loss"]),
    )
    out.append(rec)
  return out


if __name__ == "__main__":
  main()
