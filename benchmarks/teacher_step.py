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

  save()
  print(f"wrote {out_path}")
  return results


if __name__ == "__main__":
  main()
