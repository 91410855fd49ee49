"""Test set-up: 8 simulated CPU devices so sharding is exercised everywhere; shared fixtures."""

import atexit
import json
import os
import shutil
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# One persistent compilation cache for the whole session, in a fresh temporary directory, and
# inherited by the CLI / kill-and-resume subprocesses: a killed run's resume, a sweep's second
# seed and a test's second strategy compile programs an earlier test already compiled (CI's
# time budget). Results are the same executables; only XLA's compile is skipped. Under
# pytest-xdist each worker has its own sub-directory (no two processes write one cache).
if "FEDLLAVA_TEST_JAX_CACHE" not in os.environ:
  os.environ["FEDLLAVA_TEST_JAX_CACHE"] = tempfile.mkdtemp(prefix="fedllava-tests-jax-cache-")
  atexit.register(shutil.rmtree, os.environ["FEDLLAVA_TEST_JAX_CACHE"], True)
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR",
  os.path.join(
    os.environ["FEDLLAVA_TEST_JAX_CACHE"], os.environ.get("PYTEST_XDIST_WORKER", "main")
  ),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TFDS_DISABLE_GCS", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def tiny_digits(rounds=3, **overrides):
  """The offline default at CI size: digits-LT, 4 of 20 clients a round, 2 devices; overrides
  are dotted field names (``tiny_digits(2, **{"fl.server_lr": 2.0})``)."""
  from configs import digits_lt

  c = digits_lt.get_config("tiny")
  c.fl.rounds = rounds
  c.fl.clients_per_round = 4
  c.mesh.num_devices = 2
  for key, value in overrides.items():
    node = c
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return c


def three_class_example():
  """Balanced test set, 4 examples per class; train counts [150, 50, 5]: class 0 is many (>100),
  class 1 medium (20..100), class 2 few (<20)."""
  labels = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
  preds = [0, 0, 0, 1, 1, 1, 0, 2, 2, 0, 0, 1]
  return labels, preds, [150, 50, 5]


@pytest.fixture
def x64():
  """float64 for the whole-round equality oracles (DESIGN.md: float32 drifts, float64 agrees)."""
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", False)


def write_clip_tokenizer_files(d):
  """A tiny byte-level BPE vocabulary in CLIP's format (end-of-text is the highest id, as in CLIP)."""
  from transformers.models.clip.tokenization_clip import bytes_to_unicode

  base = list(bytes_to_unicode().values())
  merges = [("t", "h"), ("th", "e</w>"), ("o", "f</w>"), ("p", "h"), ("ph", "o")]
  vocab = (
    base
    + [b + "</w>" for b in base]
    + [a + b for a, b in merges]
    + ["<|startoftext|>", "<|endoftext|>"]
  )
  (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
  (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
  return len(vocab)


def tiny_clip_config(vocab_size, image=16, patch=4, width=32, proj=16, context=40):
  from transformers import CLIPConfig

  eos = vocab_size - 1
  text = dict(
    vocab_size=vocab_size,
    hidden_size=width,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=context,
    bos_token_id=eos - 1,
    eos_token_id=eos,
    pad_token_id=eos,
  )
  vision = dict(
    hidden_size=width,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=image,
    patch_size=patch,
  )
  return CLIPConfig(text_config=text, vision_config=vision, projection_dim=proj)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
  """A tiny random Flax CLIP with its tokenizer, saved in the Hugging Face layout (no torch)."""
  from transformers import CLIPTokenizer, FlaxCLIPModel

  d = tmp_path_factory.mktemp("tiny_clip")
  vocab_size = write_clip_tokenizer_files(d)
  CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt")).save_pretrained(d)
  FlaxCLIPModel(tiny_clip_config(vocab_size), seed=0).save_pretrained(d)
  return str(d)


def prepared_tfds(data_dir, *names):
  """Makes ``data_dir`` hold what TFDS checks for a prepared copy of ``names`` (the metadata, no
  records: read them under ``tfds.testing.mock_data``); returns ``data_dir`` as a str."""
  import tensorflow_datasets as tfds

  for name in names:
    builder = tfds.builder(name, data_dir=str(data_dir), file_format="array_record")
    os.makedirs(builder.data_dir, exist_ok=True)
    builder.info.write_to_directory(builder.data_dir)
  return str(data_dir)


def assert_same_tree(a, b):
  """Every leaf of ``a`` equals ``b``'s, bit for bit (same tree structure)."""
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def file_mtimes(directory):
  """``{path: st_mtime_ns}`` of every file under ``directory``: "not rewritten" checks."""
  return {
    os.path.join(r, f): os.stat(os.path.join(r, f)).st_mtime_ns
    for r, _, files in os.walk(directory)
    for f in files
  }
