"""Methods x seeds under one protocol: ``python -m fedllava.sweep``.

  python -m fedllava.sweep --config=configs/digits_lt.py --methods=fedavg,fedprox --seeds=3 \
    --workdir=workdirs/digits_sweep [--seed_list=0,4,9] [--noours] [--config.fl.rounds=50]

Every method x seed is an ordinary ``main.run`` in ``DIR/<row>/seed<k>/`` (the config with
``fl.algorithm`` and ``seed`` set, ``stages="federate"``); the paper's method is one more row,
``ours``: the config's pipeline with alignment (``pretrain`` when the config has it, then
``federate,align``), its number the alignment stage's final top-1. Runs go seed by seed (every
row at seed 0, then every row at seed 1, ...), so a stopped sweep already compares all rows.
In ``DIR``: ``table.md``, ``table.json`` (per row: mean and sample std (ddof=1) over seeds of
top-1 and many/medium/few, the per-seed values, wall time) and ``table.png``, rewritten after
each run; where the data set is one of the paper's (CIFAR-10/100-LT at IF 100/50/10,
ImageNet-LT), the paper's number (``paper_tables.py``) stands next to ours.

``--runs_together`` (the default): the seeds of a row run as one program
(``fedllava/federate/multirun.py``: their rounds stacked on a run axis, one compiled computation,
each run still an ordinary ``main.run`` in its own directory, its results equal to the run made
alone), so runs go row by row, every seed of a row at once. Every method runs this way; a
single seed, or ``--noruns_together``, runs one by one (seed by seed, as below).

Rerunning the same command resumes: a run that completed under the same config is read from its
``sweep_run.json`` and not reopened (none of its files is touched); any other run is handed to
``main.run``, which resumes it where it stopped (or reruns the stages a changed field reaches).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from typing import Optional, Sequence

import jax
import numpy as np
from absl import app, flags

from fedllava import algorithms, errors, fileio, main, paper_tables, report
from fedllava.evaluate import GROUPS

_METHODS = flags.DEFINE_list("methods", ["fedavg"], "FL methods, one row each (registry names).")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Number of seeds: config.seed = 0 .. seeds-1.")
_SEED_LIST = flags.DEFINE_list("seed_list", None, "Explicit seeds (replaces --seeds).")
_OURS = flags.DEFINE_bool("ours", True, "Add the paper's method (the config's pipeline + align).")
_TOGETHER = flags.DEFINE_bool(
  "runs_together", True, "Run the seeds of a row as one program (federate/multirun.py)."
)
_COMPILE_CACHE = flags.DEFINE_string(
  "compile_cache", None, "JAX's persistent compilation cache (default DIR/jax_cache; 'off': none)."
)

OURS = "ours"
METRICS = ("top1",) + GROUPS  # top-1, many, medium, few
RUN_FILE = "sweep_run.json"  # a completed run's numbers, the config it ran and its wall time


def check_methods(methods: Sequence[str]) -> None:
  """Refuses, in one message, names that are not in the registry (or are given twice).

  Raises:
    ConfigError: listing the known methods.
  """
  if not methods:
    raise errors.ConfigError(f"--methods is empty; choose from {list(algorithms.ALGORITHMS)}.")
  if OURS in methods:
    raise errors.ConfigError(
      f"--methods: {OURS!r} (the paper's method) is a row of every sweep; --noours drops it."
    )
  unknown = [m for m in methods if m not in algorithms.ALGORITHMS]
  if unknown:
    raise errors.ConfigError(
      f"--methods names unknown method(s) {unknown}; the known ones are "
      f"{list(algorithms.ALGORITHMS)}."
    )
  if len(set(methods)) != len(methods):
    raise errors.ConfigError(f"--methods={','.join(methods)} names a method twice.")


def ours_label(config) -> str:
  """What the ``ours`` row ran, e.g. ``fedavg + alignment (beta=0, no pretraining)``."""
  pretrained = "pretrain" in main.stage_list(config)
  head = f"pretrain + {config.fl.algorithm}" if pretrained else config.fl.algorithm
  return (
    f"{head} + alignment (beta={config.align.beta:g}{'' if pretrained else ', no pretraining'})"
  )


def plan(config, methods: Sequence[str], ours: bool = True) -> list[dict]:
  """The rows: ``{"row": directory name, "label", "stages", "algorithm", "result": the stage
  whose final report is the row's number}``, the methods first, then ``ours``."""
  rows = [
    {"row": m, "label": m, "stages": "federate", "algorithm": m, "result": "federate"}
    for m in methods
  ]
  if ours:
    before = [s for s in main.stage_list(config) if s in ("annotate", "pretrain")]
    rows.append(
      {
        "row": OURS,
        "label": ours_label(config),
        "stages": ",".join(before + ["federate", "align"]),
        "algorithm": config.fl.algorithm,
        "result": "align",
      }
    )
  return rows


def run_config(config, row: dict, seed: int):
  """The config of one run: ``config`` with the row's stages and method, and ``seed``."""
  c = copy.deepcopy(config)
  c.stages = row["stages"]
  c.fl.algorithm = row["algorithm"]
  c.seed = int(seed)
  return c


def _config_json(config) -> dict:
  return json.loads(config.to_json_best_effort(sort_keys=True))


def _read_done(run_dir: str, config) -> Optional[dict]:
  """The run's record when it completed under exactly ``config``, else None."""
  path = os.path.join(run_dir, RUN_FILE)
  try:
    with open(path) as f:
      record = json.load(f)
  except (OSError, ValueError):  # none yet, or torn: the run is reopened and the file rewritten
    return None
  return record if record.get("config") == _config_json(config) else None


@contextlib.contextmanager
def compilation_cache(path: Optional[str]):
  """JAX's persistent compilation cache in ``path`` while the sweep runs (None: untouched).

  Every run of a row compiles the same round (only the seed differs), so runs after the first
  load their executables instead of compiling them (on 2 loaded CPU cores a tiny digits run
  went from ~25 s to ~5 s). The previous settings are restored afterwards.
  """
  if not path:
    yield
    return
  from jax.experimental.compilation_cache import compilation_cache as cc

  name = "jax_compilation_cache_dir"
  before = getattr(jax.config, name)
  cc.reset_cache()  # jax decides once per process whether the cache is on
  jax.config.update(name, path)
  try:
    yield
  finally:
    jax.config.update(name, before)
    cc.reset_cache()


def run(
  config,
  methods: Sequence[str],
  seeds: Sequence[int],
  workdir: str,
  ours: bool = True,
  compile_cache: Optional[str] = None,
  runs_together: bool = True,
) -> dict:
  """Runs (or resumes) every row x seed, then writes the tables; returns ``table.json``'s dict.

  Args:
    config: the protocol (a ``ConfigDict``; not modified).
    methods: registry names, one row each.
    seeds: the values of ``config.seed``.
    workdir: the sweep's directory (runs under ``<row>/seed<k>/``).
    ours: add the paper's method as a row.
    compile_cache: a directory for JAX's persistent compilation cache (None: JAX's setting).
    runs_together: run the seeds of each row as one program (``multirun.run_many``); the
      table is the same as one by one (``tests/test_sweep.py``).
  """
  check_methods(methods)
  seeds = [int(s) for s in seeds]
  if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
    raise errors.ConfigError(f"seeds {seeds}: give distinct seeds >= 0 (--seeds=N or --seed_list).")
  rows = plan(config, methods, ours)
  for row in rows:  # every run's config is checked before anything runs
    main.validate(run_config(config, row, seeds[0]))
  os.makedirs(workdir, exist_ok=True)
  with compilation_cache(compile_cache):
    if runs_together and len(seeds) > 1:
      return _run_together(config, rows, seeds, workdir)
    return _run_all(config, rows, seeds, workdir)


def _record(row, seed, c, results, start, resumed) -> dict:
  final = results[row["result"]].report["final"]
  return {
    "row": row["row"],
    "seed": seed,
    "metrics": {k: final[k] for k in METRICS},
    "wall_s": time.time() - start,
    "resumed": resumed,  # True: wall_s is the last invocation's only
    "config": _config_json(c),
  }


def _run_all(config, rows, seeds, workdir) -> dict:
  lead = jax.process_index() == 0
  records = {}
  for seed in seeds:
    for row in rows:
      run_dir = os.path.join(workdir, row["row"], f"seed{seed}")
      c = run_config(config, row, seed)
      record = _read_done(run_dir, c)
      if record is None:
        print(f"[sweep] {row['row']} seed {seed}: {run_dir}")
        resumed = os.path.isdir(run_dir) and main._has_progress(run_dir)
        start = time.time()
        record = _record(row, seed, c, main.run(c, run_dir), start, resumed)
        if lead:
          report.write_json(os.path.join(run_dir, RUN_FILE), record)
      else:
        print(f"[sweep] {row['row']} seed {seed}: complete in {run_dir}; read, not rerun")
      records[(row["row"], seed)] = record
      table = summarize(config, rows, seeds, records)
      if lead:
        write_tables(workdir, table)
  return table


def _run_together(config, rows, seeds, workdir) -> dict:
  """Row by row, the seeds of a row not yet complete as one program (``multirun.run_many``)."""
  lead = jax.process_index() == 0
  records, table = {}, None
  for row in rows:
    todo = []
    for seed in seeds:
      run_dir = os.path.join(workdir, row["row"], f"seed{seed}")
      c = run_config(config, row, seed)
      record = _read_done(run_dir, c)
      if record is None:
        resumed = os.path.isdir(run_dir) and main._has_progress(run_dir)
        todo.append((seed, run_dir, c, resumed))
      else:
        print(f"[sweep] {row['row']} seed {seed}: complete in {run_dir}; read, not rerun")
        records[(row["row"], seed)] = record
    if todo:
      print(f"[sweep] {row['row']} seeds {[t[0] for t in todo]}: one program")
      start = time.time()
      walls = {}

      def runner(c, run_dir, make_round_fn, walls=walls):
        t0 = time.time()
        out = main.run(c, run_dir, make_round_fn=make_round_fn)
        walls[run_dir] = time.time() - t0
        return out

      outs = main.run_many(
        [t[2] for t in todo], [t[1] for t in todo], runner=runner, return_exceptions=True
      )
      failed = []
      for (seed, run_dir, c, resumed), out in zip(todo, outs):
        if isinstance(out, BaseException):
          failed.append(out)
          continue
        record = _record(row, seed, c, out, start, resumed)
        record["wall_s"] = walls[run_dir]  # its own thread's time (the runs overlap)
        if lead:
          report.write_json(os.path.join(run_dir, RUN_FILE), record)
        records[(row["row"], seed)] = record
    table = summarize(config, rows, seeds, records)
    if lead:
      write_tables(workdir, table)
    if todo and failed:  # the completed runs are recorded first
      raise (
        failed[0]
        if len(failed) == 1
        else main.MultiRunError(
          {t[1]: o for t, o in zip(todo, outs) if isinstance(o, BaseException)}
        )
      )
  return table


def _stats(values: Sequence[Optional[float]]) -> dict:
  """Mean and sample std (ddof=1; None for one seed) of the per-seed values."""
  known = [v for v in values if v is not None and math.isfinite(v)]
  if len(known) != len(values) or not known:  # a group with no class is n/a in every seed
    return {"mean": None, "std": None, "per_seed": list(values)}
  std = float(np.std(known, ddof=1)) if len(known) > 1 else None
  return {"mean": float(np.mean(known)), "std": std, "per_seed": list(values)}


def summarize(config, rows: Sequence[dict], seeds: Sequence[int], records: dict) -> dict:
  """``table.json``: per row, the stats over the seeds that have completed.

  Args:
    records: ``{(row, seed): record}`` with ``record["metrics"]`` and ``record["wall_s"]``.
  """
  dataset, imbalance = config.data.name, float(config.data.imbalance_factor)
  out_rows = []
  for row in rows:
    done = [s for s in seeds if (row["row"], s) in records]
    if not done:
      continue
    recs = [records[(row["row"], s)] for s in done]
    out = {
      "row": row["row"],
      "label": row["label"],
      "stages": row["stages"],
      "algorithm": row["algorithm"],
      "seeds": done,
      **{k: _stats([r["metrics"][k] for r in recs]) for k in METRICS},
      "wall_s": {
        "mean": float(np.mean([r["wall_s"] for r in recs])),
        "per_seed": [r["wall_s"] for r in recs],
        "resumed": [r.get("resumed", False) for r in recs],
      },
      "paper": paper_tables.lookup(row["row"], dataset, imbalance),
    }
    out_rows.append(out)
  return {
    "config": config.name,
    "dataset": dataset,
    "imbalance_factor": imbalance,
    "rounds": config.fl.rounds,
    "seeds": list(seeds),
    "std": "sample standard deviation over seeds (ddof=1); null for one seed",
    "paper_table": paper_tables.paper_setting(dataset, imbalance),
    "rows": out_rows,
  }


def _cell(stats: dict) -> str:
  if stats["mean"] is None:
    return "n/a"
  return f"{stats['mean']:.2f}" + ("" if stats["std"] is None else f" ± {stats['std']:.2f}")


def format_markdown(table: dict) -> str:
  """``table.md``: mean ± std per row; the paper's number next to each metric it reports."""
  rows = table["rows"]
  paper_keys = [k for k in METRICS if any((r["paper"] or {}).get(k) is not None for r in rows)]
  head = ["row"]
  for k in METRICS:
    head.append({"top1": "top-1"}.get(k, k))
    if k in paper_keys:
      head.append(f"paper {head[-1]}")
  head += ["seeds", "wall s/run"]
  lines = [
    f"# {table['config']}: {table['dataset']}, IF {table['imbalance_factor']:g}, "
    f"{table['rounds']} rounds, seeds {table['seeds']}",
    "",
    "| " + " | ".join(head) + " |",
    "|" + "---|" * len(head),
  ]
  for r in rows:
    cells = [r["label"]]
    for k in METRICS:
      cells.append(_cell(r[k]))
      if k in paper_keys:
        value = (r["paper"] or {}).get(k)
        cells.append("" if value is None else f"{value:.2f}")
    cells += [str(len(r["seeds"])), f"{r['wall_s']['mean']:.0f}"]
    lines.append("| " + " | ".join(cells) + " |")
  lines += [
    "",
    "Test accuracy (%) of the final round, mean ± sample std (ddof=1) over seeds; many/medium/"
    "few: > 100 / 20-100 / < 20 training images. wall s/run: the mean over seeds of the "
    "invocation that completed each run (table.json marks resumed runs).",
  ]
  if table["paper_table"]:
    lines.append(
      f"paper: copied from the paper's {table['paper_table']} (fedllava/paper_tables.py), same "
      "data set and IF; its protocol is 200 rounds, and its own method "
      f"({paper_tables.PAPER_NAMES[OURS]}) is pretrained and aligned with CLIP (beta > 0)."
    )
  return "\n".join(lines)


def save_png(table: dict, path: str) -> None:
  """Bars of the mean per row (top-1, many, medium, few side by side), std as error bars and
  each seed's value as a dot."""
  rows = table["rows"]
  fig = report._new_figure(max(6.0, 1.6 * len(rows) + 2.0), 4.8)
  ax = fig.add_subplot(1, 1, 1)
  width = 0.8 / len(METRICS)
  for j, k in enumerate(METRICS):
    xs = np.arange(len(rows)) + (j - (len(METRICS) - 1) / 2) * width
    means = [np.nan if r[k]["mean"] is None else r[k]["mean"] for r in rows]
    stds = [0.0 if r[k]["std"] is None else r[k]["std"] for r in rows]
    ax.bar(xs, means, width, yerr=stds, capsize=3, label={"top1": "top-1"}.get(k, k))
    for x, r in zip(xs, rows):
      seen = [v for v in r[k]["per_seed"] if v is not None]
      ax.plot([x] * len(seen), seen, ".", color="black", markersize=3)
  ax.set_xticks(np.arange(len(rows)), [r["label"] for r in rows], rotation=20, ha="right")
  ax.set_ylim(bottom=0.0)  # an error bar of a low mean would reach below 0
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(
    f"{table['config']}: mean ± std over {len(table['seeds'])} seed(s), dots: each seed",
    fontsize=10,
  )
  ax.grid(True, axis="y", alpha=0.3)
  ax.legend(fontsize=8)
  report._atomic_savefig(fig, path)


def write_tables(workdir: str, table: dict) -> None:
  """``table.json``, ``table.md`` and ``table.png`` in ``workdir`` (each written atomically)."""
  report.write_json(os.path.join(workdir, "table.json"), table)
  fileio.atomic_write_text(os.path.join(workdir, "table.md"), format_markdown(table) + "\n")
  if table["rows"]:
    save_png(table, os.path.join(workdir, "table.png"))


def _where_stopped(tb, workdir: str) -> str:
  """The run that was going (``_run_all``'s frame) and where in it (the runs of
  ``_run_together``'s)."""
  frames, run_dir = tb, None
  while frames is not None:
    if frames.tb_frame.f_code is _run_all.__code__:
      run_dir = frames.tb_frame.f_locals.get("run_dir")
    if frames.tb_frame.f_code is _run_together.__code__ and frames.tb_frame.f_locals.get("todo"):
      dirs = ", ".join(t[1] for t in frames.tb_frame.f_locals["todo"])
      return f"in runs {dirs} (one program; each keeps its last checkpoint)"
    frames = frames.tb_next
  if run_dir is None:
    return f"before the first run, in {workdir}"
  return f"in run {run_dir}, {main._where_stopped(tb, run_dir)}"


def seeds_from_flags() -> list[int]:
  """``--seed_list`` if given, else ``0 .. --seeds - 1``."""
  if not _SEED_LIST.value:
    return list(range(_SEEDS.value))
  try:
    return [int(s) for s in _SEED_LIST.value]
  except ValueError:
    raise errors.ConfigError(
      f"--seed_list={','.join(_SEED_LIST.value)}: give integers, e.g. --seed_list=0,4,9."
    ) from None


def cli_main(argv):
  del argv
  config = main.config_from_flags()
  workdir = main._WORKDIR.value or os.path.join("workdirs", f"{config.name}_sweep")
  cache = _COMPILE_CACHE.value or os.path.join(workdir, "jax_cache")
  cache = None if cache == "off" else cache
  main.run_cli(
    lambda: run(
      config, _METHODS.value, seeds_from_flags(), workdir, _OURS.value, cache, _TOGETHER.value
    ),
    workdir,
    lambda tb: _where_stopped(tb, workdir),
  )


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(cli_main, flags_parser=main.parse_flags)
