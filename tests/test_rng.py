"""Named random streams: fixed numbers per name (results must not move between releases)."""

import jax
import numpy as np
import pytest

from fedllava import rng


def test_streams_are_fold_ins_of_the_root_at_their_fixed_index():
  # The indices every released result was computed with (written out, not read from rng.STREAMS).
  fixed = {"federate/init": 0, "federate/augment": 1, "align": 2, "pretrain/init": 3, "fewshot": 4}
  for name, index in fixed.items():
    want = jax.random.fold_in(jax.random.PRNGKey(7), index)
    np.testing.assert_array_equal(np.asarray(rng.stream(7, name)), np.asarray(want))
  keys = {tuple(np.asarray(rng.stream(3, n)).tolist()) for n in rng.STREAMS}
  assert len(keys) == len(rng.STREAMS)
  with pytest.raises(KeyError, match="unknown random stream"):
    rng.stream(0, "federate/int")
