"""What a checkpoint holds beyond the weights, and how a resumed rank gets it back exactly: every rank's RNG.

Randomness is per rank: torch's global RNG (seeded seed+rank, CUDA's with it) and the method's generator (seeded
seed*1000+rank). A checkpoint holds every rank's, in "rng_ranks" (a list indexed by rank). Rank 0 alone writes
checkpoints, so with several ranks every rank's state is gathered (a collective all ranks join, in step) just
before each checkpoint.
"""

from __future__ import annotations

import io
import logging

import torch

log = logging.getLogger(__name__)


class RankRng:
    """This rank's RNG state, and (after `gather`) every rank's, for the checkpoint rank 0 writes."""

    def __init__(self, ctx, method) -> None:
        self.ctx, self.method = ctx, method
        self._step: int | None = None
        self._rows: list[torch.Tensor] = []

    def own(self) -> dict:
        own = {"torch": torch.get_rng_state(), "generator": self.method.state_dict()["generator"]}
        if torch.cuda.is_available():
            own["cuda"] = torch.cuda.get_rng_state_all()
        return own

    def gather(self, done: int) -> None:
        """A collective: each rank writes its serialised state into its row of a zero tensor, then a sum."""
        ctx, device = self.ctx, self.ctx.device
        buf = io.BytesIO()
        torch.save(self.own(), buf)
        blob = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
        lengths = torch.zeros(ctx.world_size, dtype=torch.int64, device=device)
        lengths[ctx.rank] = blob.numel()
        lengths = ctx.all_reduce_(lengths).tolist()
        rows = torch.zeros(ctx.world_size, max(lengths), dtype=torch.uint8, device=device)
        rows[ctx.rank, :blob.numel()] = blob.to(device)
        rows = ctx.all_reduce_(rows).cpu()
        self._step, self._rows = done, [rows[r, :n] for r, n in enumerate(lengths)]

    def states(self, done: int) -> list[dict]:
        """Every rank's RNG state, indexed by rank (rank 0: `own()` now; the others: the last gather)."""
        if self.ctx.world_size == 1:
            return [self.own()]
        if self._step != done:   # not gathered before this checkpoint: keep what is known
            log.warning("checkpoint at step %d holds only rank 0's RNG state; other ranks will resume from it", done)
            return [self.own()]
        return [self.own()] + [torch.load(io.BytesIO(row.numpy().tobytes()), weights_only=True)
                               for row in self._rows[1:]]


def restore_rng(state: dict, method, rank: int, world_size: int) -> None:
    """Put this rank's generators back as the checkpoint `state` holds them (rank 0's where it has no row)."""
    # RNG states must be CPU ByteTensors; the checkpoint was loaded onto the device.
    method_state = {**state["method"], "generator": state["method"]["generator"].cpu()}
    torch_rng = state["torch_rng"].cpu()
    rows = state.get("rng_ranks") or []   # absent from older checkpoints: every rank takes rank 0's state
    if len(rows) not in (0, world_size):
        log.warning("checkpoint holds the RNG states of %d ranks, this run has %d", len(rows), world_size)
    if rank < len(rows):
        mine = rows[rank]
        method_state["generator"], torch_rng = mine["generator"].cpu(), mine["torch"].cpu()
        cuda = mine.get("cuda")   # absent when the checkpoint was written without CUDA
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([t.cpu() for t in cuda[:torch.cuda.device_count()]])
    method.load_state_dict(method_state)
    torch.set_rng_state(torch_rng)
