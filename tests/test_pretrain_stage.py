"""Stage 1 as stages: annotate -> pretrain -> federate -> align end to end on a tiny random teacher,
the pretrain -> federate handoff bit for bit, kill and resume, complete stages not rerun, clear
errors, and the Table 4 ablation's format."""

import json
import os
import re
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util
from PIL import Image

from fedllava import checkpoint, main, stage
from fedllava.federate import rounds
from fedllava.models import resnet
from fedllava.pretrain import demo, dwp, fewshot, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import digits_lt  # noqa: E402  pylint: disable=g-import-not-at-top


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """A persistent compilation cache for this module: the killed, resumed and reloaded runs
  compile the same step programs as the first (keeps the file's CPU time down)."""
  names = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
  )
  old = {n: getattr(jax.config, n) for n in names}
  jax.config.update(names[0], str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update(names[1], 0.0)
  jax.config.update(names[2], 0)
  yield
  for n, v in old.items():
    jax.config.update(n, v)


def _demo_config():
  c = digits_lt.get_config("pretrain_demo,tiny")
  p = c.pretrain
  p.demo_images = 16
  p.annotate.kinds = "conversation"
  p.annotate.batch_size = 8
  p.batch_size, p.accum_steps, p.epochs, p.ramp_epochs = 8, 2, 2, 1.0  # 32 pairs: 8 steps
  p.checkpoint_every = 4
  c.fl.rounds = 1
  c.fl.clients_per_round = 4
  c.mesh.num_devices = 2
  return c


def _mtimes(d):
  return {
    os.path.join(r, f): os.stat(os.path.join(r, f)).st_mtime_ns
    for r, _, files in os.walk(d)
    for f in files
  }


def _flat(tree):
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  """The pretrain_demo pipeline via main.run, recording the global model stage 2's first round
  receives."""
  workdir = str(tmp_path_factory.mktemp("demo"))
  first = []
  real = rounds.create_round_fn

  def recording(*args, **kwargs):
    fn = real(*args, **kwargs)

    def wrapped(variables, *rest):
      if not first:
        first.append(jax.device_get(variables))
      return fn(variables, *rest)

    return wrapped

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(rounds, "create_round_fn", recording)
    results = main.run(_demo_config(), workdir)
  return workdir, results, first[0]


def test_pretrain_demo_runs_end_to_end(demo_run):
  workdir, results, _ = demo_run
  assert list(results) == ["annotate", "pretrain", "federate", "align"]
  ann = json.load(open(os.path.join(workdir, "annotate", "annotations.json")))
  assert {r["id"] for r in ann} == {f"digit_{i:04d}" for i in range(16)}
  assert {r["kind"] for r in ann} == {"conversation"}
  rep = results["pretrain"].report
  assert "MECHANICS CHECK" in rep["demo"]
  # 16 teacher answers (if none empty) + 16 templated captions, 2 epochs of batch 8
  n = rep["records"]
  assert 16 < n <= 32 and rep["steps"] == -(-2 * n // 8) and rep["ramp_steps"] == round(n / 8)
  assert rep["images_seen"] == 2 * n
  assert rep["fraction_of_paper"] == pytest.approx(2 * n / (4 * 595_000))
  assert rep["mfu"] is None and rep["images_per_s"] > 0  # CPU: no peak, MFU null
  rows = [json.loads(line) for line in open(os.path.join(workdir, "pretrain", "metrics.jsonl"))]
  assert [r["step"] for r in rows] == list(range(1, rep["steps"] + 1))
  alphas = [r["train/alpha"] for r in rows]
  assert alphas[0] == 0.0 and alphas[-1] == 1.0 and alphas == sorted(alphas)
  assert all(np.isfinite(r["train/loss"]) and r["perf/images_per_s"] > 0 for r in rows)
  summary = json.load(open(os.path.join(workdir, "report.json")))
  labels = [r["model"] for r in summary["rows"]]
  assert labels == ["pretrain + fedavg", "pretrain + fedavg + alignment"]
  assert summary["pretraining"]["steps"] == rep["steps"]


def test_handoff_starts_stage_2_from_exactly_the_saved_backbone(demo_run):
  """The first round's global model = the pretrain stage's last checkpoint, read with orbax
  directly (not through our Checkpointer), for every backbone and feature-MLP leaf."""
  workdir, results, first = demo_run
  ckpt = os.path.join(workdir, "pretrain", "checkpoints")
  last = max(int(d) for d in os.listdir(ckpt) if d.isdigit())
  assert last == results["pretrain"].report["steps"]
  saved = ocp.StandardCheckpointer().restore(os.path.join(ckpt, str(last), "state"))
  want = _flat({"params": saved["params"], "batch_stats": saved["batch_stats"]})
  got = _flat(first)
  body = {k for k in got if "/classifier/" not in f"/{k}"}
  assert body == {k for k in want if "/classifier/" not in f"/{k}"}
  assert any("feature_mlp" in k for k in body)
  for k in body:
    assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), k
  assert got["params/classifier/kernel"].shape[-1] == 10  # stage 2's own fresh head


def test_start_from_refuses_a_backbone_of_another_config():
  pre = resnet.create_model(resnet_config(8, 16), 1)
  fed = resnet.create_model(resnet_config(16, 16), 10)
  x = np.zeros((1, 8, 8, 3), np.float32)
  a = pre.init(jax.random.PRNGKey(0), x)
  b = fed.init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="same config.model"):
    stage.start_from(b, a)


def resnet_config(width, mlp_dim):
  c = digits_lt.get_config("tiny").model
  c.width, c.mlp_dim = width, mlp_dim
  return c


def test_complete_pipeline_is_loaded_not_rerun(demo_run):
  workdir, results, _ = demo_run
  before = {s: _mtimes(os.path.join(workdir, s)) for s in ("annotate", "pretrain", "federate")}
  again = main.run(_demo_config(), workdir)
  after = {s: _mtimes(os.path.join(workdir, s)) for s in ("annotate", "pretrain", "federate")}
  assert after == before
  for a, b in zip(
    jax.tree.leaves(again["pretrain"].variables), jax.tree.leaves(results["pretrain"].variables)
  ):
    assert np.array_equal(np.asarray(a), np.asarray(b))  # fmt: skip


def test_fewshot_table_has_the_papers_columns(demo_run, tmp_path):
  workdir, _, _ = demo_run
  cfg = _demo_config()
  cfg.pretrain.fewshot.epochs = 2
  out = fewshot.run(cfg, workdir, str(tmp_path))
  table = (tmp_path / "table4.txt").read_text().splitlines()
  head = [line for line in table if line.startswith("Dataset")][0].split()
  assert head == ["Dataset", "Initialization", "0.4%", "1%", "2%"]
  body = [line for line in table if "Pretraining" in line]
  assert body[0].startswith("digits") and "w/ Pretraining" in body[0]
  assert "w/o Pretraining" in body[1]
  for line in body:
    cells = re.findall(r"\((>?\d+), (\d+\.\d\d)\)", line)
    assert len(cells) == 3
  for row in fewshot.ROWS:
    for col in ("0.4%", "1%", "2%"):
      curve = out["curves"][row][col]
      reach, best = out["table"][row][col]
      assert len(curve) == 2 and best == max(curve)
      assert reach is None or curve[reach - 1] >= cfg.pretrain.fewshot.target
  assert "MECHANICS CHECK" in out["label"] and (tmp_path / "fig3.png").stat().st_size > 0


# ---- the pretrain stage alone, on 16 synthetic image-caption pairs ----
@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
  """A tiny random llava-hf checkpoint on disk and 16 random images with captions."""
  d = tmp_path_factory.mktemp("pairs")
  teacher = demo.write_teacher(str(d / "teacher"), seed=1)
  rs = np.random.RandomState(0)
  records = []
  os.makedirs(d / "images")
  for i in range(16):
    Image.fromarray(rs.randint(0, 256, (10, 12, 3), np.uint8)).save(d / "images" / f"{i}.png")
    records.append(
      {
        "id": str(i),
        "image": f"{i}.png",
        "conversations": [
          {"from": "human", "value": "<image>"},
          {"from": "gpt", "value": demo.caption(i % 10)},
        ],
      }
    )
  (d / "captions.json").write_text(json.dumps(records))
  return teacher, str(d / "captions.json"), str(d / "images")


def _pairs_config(pairs):
  c = _demo_config()
  c.stages = "pretrain"
  c.pretrain.demo = False
  c.pretrain.teacher, c.pretrain.data_json, c.pretrain.image_dir = pairs
  c.pretrain.batch_size, c.pretrain.accum_steps = 4, 1
  c.pretrain.epochs, c.pretrain.ramp_epochs = 2, 1.0  # 8 steps, alpha ramps over 4
  c.pretrain.checkpoint_every = 2
  return c


def test_killed_pretraining_resumes_to_the_same_parameters(pairs, tmp_path, monkeypatch):
  cfg = _pairs_config(pairs)
  main.validate(cfg)
  straight = train.run(cfg, str(tmp_path / "a"))
  assert straight.report["steps"] == 8 and straight.report["images_seen"] == 32
  assert "classifier" not in straight.variables["params"]

  calls = []
  real = dwp.DWPStep.__call__

  def killed(self, *args):
    calls.append(1)
    if len(calls) == 6:  # during step 6: steps 2 and 4 are checkpointed
      raise KeyboardInterrupt("simulated kill")
    return real(self, *args)

  monkeypatch.setattr(dwp.DWPStep, "__call__", killed)
  with pytest.raises(KeyboardInterrupt):
    train.run(cfg, str(tmp_path / "b"))
  monkeypatch.undo()
  assert not (tmp_path / "b" / "report.json").exists()
  started = []
  resumed = train.run(cfg, str(tmp_path / "b"), started=lambda: started.append(1))
  assert started == [1]
  a, b = _flat(straight.variables), _flat(resumed.variables)
  assert a.keys() == b.keys()
  for k in a:
    assert np.array_equal(a[k], b[k]), (k, np.max(np.abs(a[k] - b[k])))
  rows = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
  assert [r["step"] for r in rows] == list(range(1, 9))
  assert resumed.report["images_seen"] == 32
  # complete: loaded, not rerun, nothing rewritten
  files = _mtimes(tmp_path / "b")
  again = train.run(cfg, str(tmp_path / "b"))
  assert _mtimes(tmp_path / "b") == files and again.report == resumed.report


def test_missing_checkpoint_is_a_clear_error_naming_the_field(pairs, tmp_path):
  cfg = _pairs_config(pairs)
  cfg.stages = "pretrain,federate"
  cfg.pretrain.teacher = str(tmp_path / "no_such_llava")
  with pytest.raises(ValueError, match=r"config\.pretrain\.teacher"):
    main.run(cfg, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "config.json")
  with pytest.raises(ValueError, match=r"config\.pretrain\.teacher"):
    train.run(cfg, str(tmp_path / "stage"))  # the stage itself, without main's validation
  cfg.pretrain.teacher = ""
  with pytest.raises(ValueError, match=r"config\.pretrain\.teacher is empty"):
    main.validate(cfg)


def test_validation_demands_pretrain_fields_only_when_its_stages_run(pairs):
  main.validate(digits_lt.get_config())  # no pretraining: the empty section is fine
  cfg = _pairs_config(pairs)
  cfg.model.mlp_dim = None
  with pytest.raises(ValueError, match=r"config\.model\.mlp_dim"):
    main.validate(cfg)
  cfg = _pairs_config(pairs)
  cfg.stages = "federate,pretrain"
  with pytest.raises(ValueError, match="'pretrain' must come before 'federate'"):
    main.validate(cfg)
  cfg = _pairs_config(pairs)
  cfg.pretrain.accum_steps = 3
  with pytest.raises(ValueError, match=r"config\.pretrain\.batch_size"):
    main.validate(cfg)


def _damage_largest_array_file(step_dir):
  data_dir = os.path.join(step_dir, "state", "ocdbt.process_0", "d")
  path = max((os.path.join(data_dir, f) for f in os.listdir(data_dir)), key=os.path.getsize)
  with open(path, "r+b") as f:  # flip one bit in the middle
    f.seek(os.path.getsize(path) // 2)
    b = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([b[0] ^ 1]))


def test_raised_max_steps_continues_and_a_damaged_last_step_is_redone(pairs, tmp_path, capsys):
  """Mutations caught: a raised ``pretrain.max_steps`` reported "complete" at the old step count;
  a damaged final checkpoint handing the previous step's weights downstream as "complete"."""
  cfg = _pairs_config(pairs)
  cfg.pretrain.max_steps = 4
  main.run(cfg, str(tmp_path / "w"))
  cfg.pretrain.max_steps = 6
  more = main.run(cfg, str(tmp_path / "w"))["pretrain"]
  assert more.report["steps"] == 6
  rows = [json.loads(line) for line in open(tmp_path / "w" / "pretrain" / "metrics.jsonl")]
  assert [r["step"] for r in rows] == list(range(1, 7))
  straight = main.run(cfg, str(tmp_path / "straight"))["pretrain"]
  a, b = _flat(straight.variables), _flat(more.variables)
  for k in a:
    assert np.array_equal(a[k], b[k]), k

  # The final step (6) damaged: the stage redoes it from step 4 instead of handing step 4 on.
  _damage_largest_array_file(str(tmp_path / "w" / "pretrain" / "checkpoints" / "6"))
  capsys.readouterr()
  redone = main.run(cfg, str(tmp_path / "w"))["pretrain"]
  out = capsys.readouterr().out
  assert "round 6 is damaged" in out and "redoing it from step 4" in out
  b = _flat(redone.variables)
  for k in a:
    assert np.array_equal(a[k], b[k]), k
  record = json.loads((tmp_path / "w" / "pretrain" / "stage.json").read_text())
  assert record["complete"] and record["result"] == checkpoint.state_digest(straight.variables)


def test_report_counts_epochs_in_images_seen_not_padded_rows():
  """33 pairs, batch 16, one epoch: 3 steps hold 48 rows, 15 of them placeholders; the report
  says 1 epoch (33 images seen / 33 pairs), not 48 / 33 = 1.45."""
  c = digits_lt.get_config("pretrain_demo")
  c.pretrain.batch_size = 16
  plan = {"steps": 3}
  out = train._report(c, plan, 33, 33, "data.json", {}, [{"train/loss": 2.0}])
  assert out["epochs"] == 1.0 and out["images_seen"] == 33 and out["records"] == 33
  out = train._report(c, {"steps": 5}, 66, 33, "data.json", {}, [])  # 2 epochs in 5 steps
  assert out["epochs"] == 2.0
