"""llava-hf safetensors -> Flax: layouts, shards, bf16, sharded placement, tokenizer, clear errors."""

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from safetensors.numpy import save_file

from fedllava.models import convert
from fedllava.models.convert import checkpoint_files, load_llava, load_tokenizer
from fedllava.models.llava import LlavaModel
from fedllava.models.llava_configs import llava_config
from fedllava.models.safetensors_io import read_header, read_tensor
from fedllava.pretrain import demo

jax.config.update("jax_default_matmul_precision", "highest")
IMG = llava_config("test").image_token_index


def to_hf_state_dict(params):
  """Inverse of the converter's mapping (legacy llava-hf layout), for torch-free checkpoints."""
  out = {}

  def walk(node, path):
    for k, v in node.items():
      if isinstance(v, dict):
        walk(v, path + (k,))
        continue
      v = np.asarray(v)
      name, leaf = ".".join(path), k
      if leaf == "kernel":
        v, leaf = (v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T), "weight"
      elif leaf in ("scale", "embedding"):
        leaf = "weight"
      out[f"{name}.{leaf}"] = np.ascontiguousarray(v)

  walk(params, ())
  return out


def write_checkpoint(path, config, tensors, shards=1):
  os.makedirs(path, exist_ok=True)
  config.save_pretrained(path)
  keys = sorted(tensors)
  if shards == 1:
    save_file({k: tensors[k] for k in keys}, os.path.join(path, "model.safetensors"))
    return
  weight_map = {}
  for i in range(shards):
    name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
    part = keys[i::shards]
    save_file({k: tensors[k] for k in part}, os.path.join(path, name))
    weight_map.update({k: name for k in part})
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)


@pytest.fixture(scope="module")
def flax_ref():
  model = LlavaModel(llava_config("test"), dtype=jnp.float32)
  return model, model.init_params(jax.random.PRNGKey(0))


def inputs():
  rs = np.random.RandomState(0)
  ids = np.array([[1, 5, *[IMG] * 4, 7, 8, 9]], np.int32)
  return rs.randn(1, 3, 28, 28).astype(np.float32), ids, np.ones_like(ids)


def assert_same_tree(a, b, atol=0.0):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), atol=atol)


@pytest.mark.parametrize("shards", [1, 3])
def test_roundtrip_without_torch(tmp_path, flax_ref, shards):
  model, params = flax_ref
  write_checkpoint(tmp_path, model.config, to_hf_state_dict(params), shards)
  assert len(checkpoint_files(str(tmp_path))) == shards
  _, loaded = load_llava(tmp_path, dtype=jnp.float32, verbose=False)
  assert_same_tree(loaded, params)


def test_new_key_layout(tmp_path, flax_ref):
  model, params = flax_ref
  sd = to_hf_state_dict(params)
  renamed = {}
  for k, v in sd.items():
    k = (
      k.replace("language_model.model.", "model.language_model.")
      .replace("language_model.lm_head", "lm_head")
      .replace("vision_tower.", "model.vision_tower.")
      .replace("multi_modal_projector.", "model.multi_modal_projector.")
    )
    renamed[k] = v
  assert "lm_head.weight" in renamed and "model.language_model.norm.weight" in renamed
  write_checkpoint(tmp_path, model.config, renamed)
  _, loaded = load_llava(tmp_path, dtype=jnp.float32, verbose=False)
  assert_same_tree(loaded, params)


def test_bf16_raw_reader_and_cast(tmp_path, flax_ref, capsys):
  model, params = flax_ref
  sd = {k: v.astype(ml_dtypes.bfloat16) for k, v in to_hf_state_dict(params).items()}
  write_checkpoint(tmp_path, model.config, sd)
  file = str(tmp_path / "model.safetensors")
  header, start = read_header(file)
  key = "language_model.model.embed_tokens.weight"
  assert header[key]["dtype"] == "BF16"
  raw = read_tensor(file, header[key], start)
  assert raw.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(raw.view(np.uint16), sd[key].view(np.uint16))
  _, loaded = load_llava(tmp_path, verbose=True)  # bf16 default
  assert "GiB at bfloat16" in capsys.readouterr().out
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(loaded))
  assert_same_tree(loaded, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))
  _, as_f32 = load_llava(tmp_path, dtype=jnp.float32, verbose=False)
  assert jax.tree.leaves(as_f32)[0].dtype == jnp.float32


def test_sharded_placement_over_mesh(tmp_path, flax_ref):
  model, params = flax_ref
  write_checkpoint(tmp_path, model.config, to_hf_state_dict(params), shards=2)
  mesh = Mesh(np.array(jax.devices()[:8]), ("model",))
  m2, loaded = load_llava(tmp_path, dtype=jnp.float32, mesh=mesh, verbose=False)
  emb = loaded["language_model"]["model"]["embed_tokens"]["embedding"]
  assert emb.sharding.spec == P("model", None) and len(emb.sharding.device_set) == 8
  pix, ids, mask = inputs()
  np.testing.assert_allclose(
    m2.forward(loaded, jnp.asarray(pix), ids, mask),
    model.forward(params, jnp.asarray(pix), ids, mask),
    atol=1e-5,
  )


def test_pytorch_checkpoint_sharded_bf16_and_tokenizer(tmp_path):
  torch = pytest.importorskip(
    "torch", reason="PyTorch oracle tests need torch (requirements-test.txt)"
  )
  from transformers import LlavaForConditionalGeneration

  torch.manual_seed(0)
  config = llava_config("test", num_key_value_heads=4)  # MHA here; GQA in test_llava
  tm = LlavaForConditionalGeneration(config).eval()
  tm.save_pretrained(tmp_path / "f32", safe_serialization=True, max_shard_size="20KB")
  assert os.path.isfile(tmp_path / "f32" / "model.safetensors.index.json")
  model, params = load_llava(tmp_path / "f32", dtype=jnp.float32, verbose=False)
  pix, ids, mask = inputs()
  with torch.no_grad():
    want = tm(
      input_ids=torch.tensor(ids, dtype=torch.long),
      pixel_values=torch.tensor(pix),
      attention_mask=torch.tensor(mask),
    ).logits.numpy()
  np.testing.assert_allclose(model.forward(params, jnp.asarray(pix), ids, mask), want, atol=1e-4)
  # bf16 checkpoint written by torch: converted weights equal torch's bf16 values exactly
  tm.to(torch.bfloat16).save_pretrained(tmp_path / "bf16", safe_serialization=True)
  _, pb = load_llava(tmp_path / "bf16", verbose=False)
  w = tm.model.language_model.layers[0].self_attn.q_proj.weight.detach().float().numpy()
  got = pb["language_model"]["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
  np.testing.assert_array_equal(np.asarray(got, np.float32), w.T)
  # tokenizer saved with the checkpoint, loaded through AutoTokenizer
  tok = _tiny_tokenizer()
  tok.save_pretrained(tmp_path / "f32")
  loaded_tok = load_tokenizer(tmp_path / "f32")
  assert loaded_tok("a cat").input_ids == tok("a cat").input_ids


def _tiny_tokenizer():
  from tokenizers import pre_tokenizers

  tokens = ["<unk>", "<s>", "</s>", "a", "cat"]
  return demo.word_level_tokenizer(tokens, pre_tokenizers.Whitespace(), bos=False)


# ---- clear errors ----
def test_error_no_config_or_not_llava(tmp_path):
  with pytest.raises(FileNotFoundError, match="no config.json"):
    load_llava(tmp_path, verbose=False)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_llava(tmp_path / "nope", verbose=False)
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
  with pytest.raises(ValueError, match="model_type 'llama'; expected 'llava'"):
    load_llava(tmp_path, verbose=False)


def test_error_missing_shard_and_no_weights(tmp_path, flax_ref):
  model, params = flax_ref
  model.config.save_pretrained(tmp_path)
  with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
    load_llava(tmp_path, verbose=False)
  write_checkpoint(tmp_path, model.config, to_hf_state_dict(params), shards=3)
  os.remove(tmp_path / "model-00002-of-00003.safetensors")
  with pytest.raises(FileNotFoundError, match=r"missing .*model-00002-of-00003.safetensors"):
    load_llava(tmp_path, verbose=False)


def test_error_vocab_mismatch(tmp_path, flax_ref):
  model, params = flax_ref
  write_checkpoint(tmp_path, model.config, to_hf_state_dict(params))
  cfg = json.loads((tmp_path / "config.json").read_text())
  cfg["text_config"]["vocab_size"] = 70
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=r"vocab_size=70 but language_model\.\S+ has 64 rows"):
    load_llava(tmp_path, verbose=False)


def test_error_unmapped_and_missing_keys(tmp_path, flax_ref):
  model, params = flax_ref
  sd = to_hf_state_dict(params)
  del sd["multi_modal_projector.linear_2.bias"]
  sd["vision_tower.vision_model.encoder.layers.0.extra.weight"] = np.zeros((2, 2), np.float32)
  sd["something_else.weight"] = np.zeros((2,), np.float32)
  write_checkpoint(tmp_path, model.config, sd)
  with pytest.raises(ValueError) as e:
    load_llava(tmp_path, verbose=False)
  msg = str(e.value)
  assert "something_else.weight" in msg and "layers.0.extra.weight" in msg
  assert "multi_modal_projector.linear_2.bias" in msg


def test_map_key_rules():
  assert convert.map_key("vision_tower.vision_model.embeddings.patch_embedding.weight", 4) == (
    ("vision_tower", "vision_model", "embeddings", "patch_embedding", "kernel"),
    "conv",
  )
  assert convert.map_key("vision_tower.vision_model.pre_layrnorm.weight", 1)[0][-1] == "scale"
  assert convert.map_key("model.language_model.norm.weight", 1)[0] == (
    "language_model",
    "model",
    "norm",
    "weight",
  )
  assert convert.map_key("lm_head.weight", 2) == (("language_model", "lm_head", "kernel"), "T")
  assert (
    convert.map_key("vision_tower.vision_model.embeddings.class_embedding", 1)[0][-1]
    == "class_embedding"
  )
  assert convert.map_key("text_model.foo.weight", 2) is None
