"""Stage 2: federated finetuning (paper Sec. 3.2) — the round loop, one jitted sharded round,
and a client's local training."""

from fedllava.federate.loop import run, validate

__all__ = ["run", "validate"]
