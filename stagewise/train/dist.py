"""Data-parallel training on torchrun: launch, process group, the one all-reduce per step, rank slices.

``devices: N`` (``train.devices`` / ``diffusion.devices``) > 1 makes the stage's entry point re-launch itself
under ``torchrun`` (``torch.distributed.run``, part of torch) with N processes on this machine, NCCL on GPU
(one device per rank) and gloo on CPU. Each rank runs the same loop (``runner.Runner``) on its slice of the
same global batch: the batch a one-process run draws at that step, from the same (seed, step) streams, so
the data order stays a pure function of (seed, step) and a resume is exact whichever rank was killed.

Gradients are averaged with one bucketed all-reduce per optimizer step, after the micro-batches of
gradient accumulation (what ``DistributedDataParallel`` does under ``no_sync``); it is done here rather than
by wrapping the model because the autoencoder calls ``encode`` / ``decode`` (never ``forward``, which DDP
hooks) and its discriminator trains beside it. The step's loss travels in the same buffer, so every rank
sees the same averaged loss and gradients and takes the same finite / skip decision: the NaN guard, LRD
masks (seeded from (seed, step)), EMA and the GAN stay identical on every rank.

A rank that fails makes torchrun stop the others (``--max-restarts 0``); backups are written by rank 0
alone, atomically, so the last good one stays intact and the same command resumes from it.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from dataclasses import dataclass

import torch

from stagewise.cli import StageError

log = logging.getLogger(__name__)
BUCKET_BYTES = 32 << 20  # gradients per all-reduce: big enough to amortise its latency, small enough not to double memory


def launched() -> bool:
    """This process is a torchrun worker (torchrun sets WORLD_SIZE / LOCAL_RANK for each)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def batch_split_error(batch_size: int, devices: int, devices_key: str) -> str | None:
    """Why ``batch_size`` cannot be split over ``devices`` ranks (None: it can). The global batch must split
    evenly: each rank's mean loss then averages to the global batch's."""
    if devices > 1 and batch_size % devices:
        return f"{batch_size} does not divide over {devices} devices ({devices_key}); make it a multiple of {devices} (each rank trains batch_size / devices rows)"
    return None


def relaunch(module: str, devices: int, argv: list[str]) -> None:
    """Run ``python -m module argv`` on ``devices`` processes under torchrun and exit with its status.

    torchrun's agent runs in this process (the ranks are its children); its rendezvous store listens on
    127.0.0.1 (this machine only). It stops every rank when one fails; this process then exits 1."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    args = ["--nnodes=1", f"--nproc-per-node={devices}", "--max-restarts=0", "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0",
            f"--rdzv-id={uuid.uuid4().hex}", "-m", module, *argv]
    log.info("%s: launching %d processes under torchrun", module, devices)
    try:
        torchrun(args)
    except ChildFailedError as exc:
        failed = ", ".join(f"rank {rank} ({f.signal_name() if f.exitcode < 0 else f'exit {f.exitcode}'})" for rank, f in exc.failures.items())
        log.error("%s: %s failed; torchrun stopped the other ranks, and the backups written so far are intact: "
                  "run the same command again to resume from the newest", module, failed)
        sys.exit(1)
    sys.exit(0)


@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: torch.device) -> "Dist":
        """One process (world 1) unless launched by torchrun; then join its group: NCCL with a GPU per
        rank (cuda:LOCAL_RANK), gloo on CPU."""
        if not launched() or int(os.environ["WORLD_SIZE"]) == 1:
            return cls(0, 1, device)
        import torch.distributed as dist

        local = int(os.environ["LOCAL_RANK"])
        if device.type == "cuda":
            if local >= torch.cuda.device_count():
                raise StageError(f"devices = {os.environ.get('LOCAL_WORLD_SIZE', '?')} ranks on this machine, but it has {torch.cuda.device_count()} GPU(s); lower train.devices / diffusion.devices to at most that")
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
        rank = dist.get_rank()
        if rank:  # one log: rank 0's (the others' warnings and errors still show)
            logging.getLogger().setLevel(logging.WARNING)
        return cls(rank, dist.get_world_size(), device)

    # --------------------------------------------------------------------------------- collectives

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def average(self, values: torch.Tensor) -> torch.Tensor:
        """The mean of ``values`` over the ranks (a copy)."""
        if self.world == 1:
            return values
        import torch.distributed as dist

        out = values.clone()
        dist.all_reduce(out)
        return out.div_(self.world)

    def average_gradients(self, params: list[torch.nn.Parameter], loss: torch.Tensor) -> torch.Tensor:
        """Average the gradients of ``params`` in place and return the averaged ``loss``, in buckets of
        ``BUCKET_BYTES`` (the loss rides in the first)."""
        if self.world == 1:
            return loss
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        grads = [p.grad for p in params if p.grad is not None]
        buckets: list[list[torch.Tensor]] = [[]]
        size = 0
        for g in grads:
            if size and size + g.numel() * g.element_size() > BUCKET_BYTES:
                buckets.append([])
                size = 0
            buckets[-1].append(g)
            size += g.numel() * g.element_size()
        averaged = loss
        for i, bucket in enumerate(buckets):
            parts = bucket + ([loss.detach().reshape(1).to(bucket[0].dtype if bucket else loss.dtype)] if i == 0 else [])
            if not parts:
                continue
            flat = _flatten_dense_tensors(parts)
            dist.all_reduce(flat)
            flat.div_(self.world)
            for g, synced in zip(parts, _unflatten_dense_tensors(flat, parts)):
                g.copy_(synced)
            if i == 0:
                averaged = parts[-1].reshape(()).to(loss.dtype)
        return averaged

    # ------------------------------------------------------------------------------------ batch slices

    def rows(self, batch: int) -> slice:
        """This rank's rows of a global batch of ``batch`` rows."""
        local = batch // self.world
        return slice(self.rank * local, (self.rank + 1) * local)

    def split(self, x: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """This rank's rows of ``x``, a global batch made of ``groups`` equal blocks (the autoencoder's two
        domains): the same slice of each block, so each rank keeps the blocks' balance."""
        if self.world == 1:
            return x
        block = len(x) // groups
        part = self.rows(block)
        return torch.cat([x[g * block + part.start : g * block + part.stop] for g in range(groups)]) if groups > 1 else x[part]

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
