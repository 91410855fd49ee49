"""One root key per run, split into named streams (STYLE.md: one root key, named keys).

Every random choice of a run comes from ``PRNGKey(config.seed)``. Each consumer asks for its own
stream by name; the stream is ``fold_in(root, index)`` with the name's fixed index below, so two
streams never share a key and a name keeps its numbers across releases (reordering or inserting
names would change every result: append new names at the end).
"""

from __future__ import annotations

import jax

# name -> fold_in index. Append only.
STREAMS = (
  "federate/init",  # stage 2's global model
  "federate/augment",  # stage 2's per-client augmentation (folded with round and client)
  "align",  # stage 3's batch order and augmentation (folded with the round)
  "pretrain/init",  # stage 1's g_fl
  "fewshot",  # Table 4's ablation
  "federate/server",  # stage 2's server step (a method's state and its per-round key)
)


def stream(seed: int, name: str) -> jax.Array:
  """The key of stream ``name`` of a run seeded ``seed``: ``fold_in(PRNGKey(seed), index)``.

  Raises:
    KeyError: ``name`` is not one of ``STREAMS``.
  """
  if name not in STREAMS:
    raise KeyError(f"unknown random stream {name!r}; known: {STREAMS}")
  return jax.random.fold_in(jax.random.PRNGKey(seed), STREAMS.index(name))
