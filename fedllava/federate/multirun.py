"""Several runs of one method (seeds) as one program: ``run_many(configs, workdirs)``.

R runs that differ only in ``config.seed`` are R independent client sets with the same shapes.
Each run is an ordinary ``loop.run`` (or ``main.run``: ``runner``) in its own workdir, in its
own thread, writing exactly what it writes alone (metrics, checkpoints, report, ...); only the
round itself is shared: every run hands its round's arguments to one ``_Lockstep``, which, once
every run still going has handed in its round, stacks them on a leading run axis and runs
``rounds.create_multirun_round_fn`` (the one-run round ``jax.vmap``-ed over runs: one compiled
computation, each lane aggregating its own clients) and hands each run its lane back.

Why vmap over runs and not runs x clients flattened into the client axis: the round is
unchanged (its reductions stay per run by construction, no per-run segment sums to get wrong),
every argument (the global model, server state, server key) is per run for free, and the client
axis stays sharded over the mesh as before, so each device trains its share of every run.

Padding: runs whose client stores have different padded lengths (``data.partition=dirichlet``)
are padded to the longest, images and labels with copies of each client's first example (as
``federated.build`` pads) and batch plans with inactive steps at the end (a masked step changes
nothing; the real steps keep their augmentation keys). A method whose client upload reads the
whole padded store (``client_upload``: CCVR, CReFF, CLIP2FL; CReFF draws its gradient batches
over the padded length) or that has per-example side data is not padded: its runs are grouped
by shape, one computation per group. Every method runs this way (all are pure jax); results
equal the runs made one by one (``tests/test_multirun.py``, float64).

Resume: every run checkpoints as alone, so a killed ``run_many`` resumes each run from its own
last checkpoint; runs at different rounds still share the computation (each lane carries its
own round). A run that diverges stops as alone (``DivergedError``, its last finite checkpoint
intact) and leaves the lockstep; the others go on to the end. ``run_many`` then raises
``MultiRunError`` listing each failed run (or, ``return_exceptions=True``, returns it in its
place). Ctrl-C stops every run at its next round (each keeps its last checkpoint).
"""

from __future__ import annotations

import json
import threading
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from fedllava import errors
from fedllava.federate import loop, rounds


class MultiRunError(RuntimeError):
  """Some runs of ``run_many`` failed; ``failures`` maps their workdirs to the exceptions."""

  def __init__(self, failures: dict):
    self.failures = failures
    lines = [f"{d}: {type(e).__name__}: {e}" for d, e in failures.items()]
    super().__init__(f"{len(failures)} run(s) failed (the others completed):\n" + "\n".join(lines))


class _Stopped(Exception):
  """Internal: the lockstep was stopped (Ctrl-C in the main thread)."""


def _fingerprint(config) -> dict:
  c = json.loads(config.to_json_best_effort(sort_keys=True))
  c.pop("seed", None)
  return c


def check_configs(configs: Sequence, workdirs: Sequence[str]) -> None:
  """The runs differ in ``seed`` only, and each has its own workdir.

  Raises:
    ConfigError: naming what differs.
  """
  if len(configs) != len(workdirs) or not configs:
    raise errors.ConfigError(f"run_many: {len(configs)} configs for {len(workdirs)} workdirs.")
  if len(set(workdirs)) != len(workdirs):
    raise errors.ConfigError(f"run_many: a workdir is given twice: {list(workdirs)}.")
  first = _fingerprint(configs[0])
  for c in configs[1:]:
    other = _fingerprint(c)
    if other != first:
      diff = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
      raise errors.ConfigError(
        f"run_many runs configs that differ only in config.seed; these differ in {diff}."
      )


def _signature(tree) -> tuple:
  leaves, treedef = jax.tree.flatten(tree)
  return (treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves))


def _pad_axis1(x, n: int, mode: str):
  """``x`` padded along axis 1 to ``n``: ``edge0`` repeats index 0, ``zeros`` appends zeros."""
  extra = n - x.shape[1]
  if extra <= 0:
    return x
  if mode == "edge0":
    tail = jnp.repeat(x[:, :1], extra, axis=1)
  else:
    tail = jnp.zeros((x.shape[0], extra) + x.shape[2:], x.dtype)
  return jnp.concatenate([x, tail], axis=1)


class _Lockstep:
  """Collects one round from every run still going, runs them as one computation."""

  def __init__(self, num_runs: int):
    self._cond = threading.Condition()
    self._going = set(range(num_runs))  # runs that may still hand in a round
    self._pending: dict = {}  # run -> (args, slot)
    self._fn: Optional[Callable] = None
    self._algorithm = None
    self._lanes: dict = {}  # shape signature -> lanes compiled for it (dead runs: dummy lanes)
    self._stopped = False
    self.calls = 0  # computations run (tests: one per round)

  def factory(self, run_index: int) -> Callable:
    """``make_round_fn`` for ``loop.run``: ``create_round_fn``'s arguments -> this run's round."""

    def make_round_fn(trainer, algorithm, mesh, strategy="vmap", group_size=1):
      with self._cond:
        if self._fn is None:
          self._fn = rounds.create_multirun_round_fn(trainer, algorithm, mesh, strategy, group_size)
          self._algorithm = algorithm
      return lambda *args: self._submit(run_index, *args)

    return make_round_fn

  def leave(self, run_index: int) -> None:
    with self._cond:
      self._going.discard(run_index)
      self._maybe_run()

  def stop(self) -> None:
    with self._cond:
      self._stopped = True
      self._cond.notify_all()

  def _submit(self, run_index, variables, server_state, inputs, server_inputs=None):
    if server_inputs is None:
      server_inputs = {"data": None, "key": None}
    slot: dict = {}
    with self._cond:
      if self._stopped:
        raise _Stopped()
      self._pending[run_index] = ((variables, server_state, inputs, server_inputs), slot)
      self._maybe_run()
      while not slot and not self._stopped:
        self._cond.wait()
      if "error" in slot:
        raise slot["error"]
      if "out" not in slot:
        raise _Stopped()
      return slot["out"]

  def _maybe_run(self) -> None:
    """Under the lock: once every run going has handed in its round, runs them all."""
    if not self._pending or not self._going <= set(self._pending):
      return
    batch, self._pending = self._pending, {}
    try:
      outs = self._run({i: args for i, (args, _) in batch.items()})
      for i, (_, slot) in batch.items():
        slot["out"] = outs[i]
    except BaseException as e:  # every run of the batch sees the error
      for _, slot in batch.values():
        slot["error"] = e
    self._cond.notify_all()

  def _pad(self, batch: dict) -> dict:
    """Client stores to the longest padded length, plans to the most steps (see module doc)."""
    algo = self._algorithm
    if algo.client_upload is not None or algo.side_data is not None:
      return batch  # grouped by shape instead
    n = max(args[2].images.shape[1] for args in batch.values())
    s = max(args[2].plan.active.shape[1] for args in batch.values())
    out = {}
    for i, (v, st, inp, si) in batch.items():
      plan = jax.tree.map(lambda x: _pad_axis1(x, s, "zeros"), inp.plan)
      inp = inp._replace(
        images=_pad_axis1(inp.images, n, "edge0"),
        labels=_pad_axis1(inp.labels, n, "edge0"),
        plan=type(inp.plan)(*plan),
      )
      out[i] = (v, st, inp, si)
    return out

  def _run(self, batch: dict) -> dict:
    batch = self._pad(batch)
    groups: dict = {}
    for i in sorted(batch):
      groups.setdefault(_signature(batch[i]), []).append(i)
    outs = {}
    for sig, members in groups.items():
      lanes = max(self._lanes.get(sig, 0), len(members))
      self._lanes[sig] = lanes  # a run that stopped keeps its lane (a copy): no recompile
      args = [batch[i] for i in members] + [batch[members[0]]] * (lanes - len(members))
      stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *args)
      out = self._fn(*stacked)
      self.calls += 1
      for j, i in enumerate(members):
        outs[i] = jax.tree.map(lambda x, j=j: x[j], out)
    return outs


def run_many(
  configs: Sequence,
  workdirs: Sequence[str],
  *,
  runner: Optional[Callable] = None,
  return_exceptions: bool = False,
  lockstep: Optional[_Lockstep] = None,
) -> list[Any]:
  """Runs (or resumes) stage 2 of every config in its workdir, the rounds as one program.

  Args:
    configs: configs identical but for ``seed`` (``check_configs``).
    workdirs: one per config: what ``loop.run(config, workdir)`` alone writes is written there.
    runner: ``runner(config, workdir, make_round_fn=...) -> result`` (default ``loop.run``;
      ``fedllava.sweep`` passes ``main.run`` for the whole pipeline of a run).
    return_exceptions: return a failed run's exception in its place instead of raising.
    lockstep: tests only (to count the computations).
  Returns:
    Each run's result, in order.
  Raises:
    MultiRunError: some run failed (after the others completed).
  """
  check_configs(configs, workdirs)
  runner = runner or loop.run
  step = lockstep or _Lockstep(len(configs))
  results: list[Any] = [None] * len(configs)

  def one(i):
    try:
      results[i] = runner(configs[i], workdirs[i], make_round_fn=step.factory(i))
    except BaseException as e:  # noqa: BLE001 -- handed to the caller below
      results[i] = e
    finally:
      step.leave(i)

  print(
    f"[multirun] {len(configs)} runs (seeds {[c.seed for c in configs]}) of "
    f"{configs[0].fl.algorithm}, their rounds as one program"
  )
  threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(configs))]
  for t in threads:
    t.start()
  try:
    for t in threads:
      t.join()
  except KeyboardInterrupt:  # every run stops at its next round; their checkpoints stay
    step.stop()
    for t in threads:
      t.join()
    raise
  failures = {
    workdirs[i]: r
    for i, r in enumerate(results)
    if isinstance(r, BaseException) and not isinstance(r, _Stopped)
  }
  interrupts = [r for r in failures.values() if not isinstance(r, Exception)]
  if interrupts and not return_exceptions:
    raise interrupts[0]  # a KeyboardInterrupt (a kill) stays one
  if failures and not return_exceptions:
    if len(failures) == 1:
      raise next(iter(failures.values()))
    raise MultiRunError(failures)
  return results
