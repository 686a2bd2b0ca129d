"""Inside one rank of a multi-process run: metrics that speak for all ranks, and one stop step for all ranks.

A rank's own stop signals (and the copies its launcher passes on) are told apart in trainer/run/stopping.py.

Rank 0 alone writes the run's files (RunDir(writer=False) elsewhere); what it writes must still describe the
whole job, so real-token counts are summed over the ranks when a train line is logged (one all-reduce per
logged line, none per step).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from trainer.run.callbacks import MetricsCallback, TokenCounter


class GlobalTokens:
    """This rank's TokenCounter as MetricsCallback reads it: the local count, except while a train line is being
    logged, when it is the count of all ranks together."""

    def __init__(self, local: TokenCounter):
        self.local = local
        self.total: int | None = None

    @property
    def tokens(self) -> int:
        return self.total if self.total is not None else self.local.tokens

    @tokens.setter
    def tokens(self, value: int) -> None:  # MetricsCallback takes eval batches back out, rank by rank
        self.local.tokens = value

    def sum_over_ranks(self) -> None:
        import torch
        from accelerate import PartialState
        from accelerate.utils import reduce

        count = torch.tensor([self.local.tokens], dtype=torch.int64, device=PartialState().device)
        self.total = int(reduce(count, reduction="sum").item())


class RankMetrics(MetricsCallback):
    """MetricsCallback whose tokens/s counts every rank's tokens; every rank joins the sum, rank 0 writes."""

    def __init__(self, run: Any, counter: TokenCounter, is_main: bool, world_size: int):
        self.world_size = world_size
        super().__init__(run, GlobalTokens(counter) if world_size > 1 else counter, is_main)

    def on_log(self, args, state, control, logs=None, **kwargs):
        summing = self.world_size > 1 and "loss" in (logs or {})
        if summing:
            self.counter.sum_over_ranks()
        try:
            return super().on_log(args, state, control, logs=logs, **kwargs)
        finally:
            if summing:
                self.counter.total = None


def signal_agreement() -> Callable[[int], int]:
    """A collective that gives every rank the largest stop signal number any rank has got (0: none), once per
    step. It runs over a CPU (gloo) group, so it adds no GPU synchronisation to a NCCL run; every rank must call
    this together, after the Trainer has set up the process group."""
    import torch
    import torch.distributed as dist

    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")

    def agree(signum: int) -> int:
        flag = torch.tensor([signum], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return int(flag.item())

    return agree
