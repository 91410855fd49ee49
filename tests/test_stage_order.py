"""main's registry owns the stage order: every wrong order is one message naming config.stages."""

import pytest
from conftest import tiny_digits

from fedllava import errors, main


@pytest.mark.parametrize(
  "stages, message",
  [
    ("federate,pretrain", "'pretrain' must come before 'federate'"),
    ("pretrain,annotate", "'annotate' must come before 'pretrain'"),
    ("align,federate", "'federate' must come before it"),
    ("align", "'federate' must come before it"),
    ("pretrain,align", "'federate' must come before it"),
  ],
)
def test_wrong_stage_orders_are_refused_by_main(stages, message):
  with pytest.raises(errors.ConfigError, match=f"config.stages={stages!r}.*{message}"):
    main.check_stage_order(tiny_digits(stages=stages))


@pytest.mark.parametrize(
  "stages", ["federate", "federate,align", "annotate", "pretrain,federate", "annotate,pretrain"]
)
def test_right_orders_pass(stages):
  main.check_stage_order(tiny_digits(stages=stages))
