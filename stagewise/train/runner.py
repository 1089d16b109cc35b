"""The training loop both model families run: edm2's status -> snapshot -> checkpoint -> done -> step.

``StageTrainer`` (the autoencoder, ``train@<stage>``) and ``PhaseTrainer`` (the diffusion phases,
``diffuse@<phase>``) subclass ``Runner`` and supply only what differs:

    step()                  one optimizer step (it calls ``sync_gradients`` before its optimizer step)
    snapshot()              what is due every ``next_snapshot`` images: preview.png, or the validation grid
    backup_state()          (tensors, meta) of a backup; ``load_backup(tensors, meta, counters_too)`` restores it
    cadence()               the due points at the current progress (``Cadence``)
    status_fields(row)      the family's history columns (lr, epoch) and progress-bar postfix
    after_rollback()        re-apply hyper-parameters after the scales changed; the event's extra fields
    finish()                the published outputs
    counters                the object holding images_seen, lr_scale, eps_scale, rollbacks, wall_s, history, events
    step_index              the optimizer steps taken (the whole random state: every draw is seeded from it)

What the runner owns, in one place for both: the NaN guard's status check and rollback (with its bounded
failure), backups (rolling, start, end; a disk-full message that says what is safe), short cycles, events,
the progress bar, and the distributed part (``stagewise.train.dist``): every rank runs this same loop on its
slice of the global batch, gradients and the loss are averaged before the optimizer step (so every rank
takes the same finite/skip decision and keeps identical weights), the status sums are averaged, and rank 0
alone writes backups, events, previews and outputs, with a barrier after each save so a rollback or short
cycle on any rank reads a complete file.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from stagewise.cli import StageError
from stagewise.io import write_text
from stagewise.train import checkpoint as ckpt
from stagewise.train.dist import Dist
from stagewise.train.schedule import NEVER, next_point

log = logging.getLogger(__name__)
# A debug switch for tests, as guard.POISON_ENV: ``STAGEWISE_KILL_AT_STEP=1:7`` makes rank 1 SIGKILL itself
# before step 7 (a rank that dies at a known point, without racing a signal from outside).
KILL_ENV = "STAGEWISE_KILL_AT_STEP"


@dataclass(frozen=True)
class Cadence:
    next_log: float  # images_seen at which the next status (history row, guard check) is due
    next_save: float  # ... the next rolling backup
    next_snapshot: float  # ... the next preview / validation during the run (NEVER: at the end only)
    next_cycle: float = NEVER  # ... the next short cycle, taken at the first rolling backup from there


def cadence(images_seen: int, log_every_kimg: float | None, save_every_kimg: float | None, snapshot_every_kimg: float | None = None, short_cycle_kimg: float | None = None) -> Cadence:
    return Cadence(next_point(images_seen, log_every_kimg), next_point(images_seen, save_every_kimg), next_point(images_seen, snapshot_every_kimg), next_point(images_seen, short_cycle_kimg))


class Runner:
    kind = "stage"  # "stage" / "phase": how messages name a run
    section = "train.stages"  # where its params live, for messages that name the key
    kimg_digits = 3  # history rows' kimg rounding

    # ------------------------------------------------------------------------------ family interface

    counters: Any
    name: str

    @property
    def step_index(self) -> int:
        raise NotImplementedError

    def cadence(self) -> Cadence:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    def snapshot(self) -> None:
        raise NotImplementedError

    def backup_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        raise NotImplementedError

    def load_backup(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], counters_too: bool = True) -> None:
        raise NotImplementedError

    def status_fields(self, row: dict[str, Any]) -> dict[str, Any]:
        return {}

    def postfix(self, row: dict[str, Any]) -> dict[str, str]:
        return {}

    def after_rollback(self) -> dict[str, Any]:
        return {}

    def finish(self) -> dict[str, Any]:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------ setup

    def init_runner(self, device: torch.device) -> torch.device:
        """Join the process group when launched by torchrun; the device this rank trains on."""
        self.dist = Dist.from_env(device)
        self.sums: dict[str, torch.Tensor] = {}
        self.sum_steps = 0
        self.pbar = tqdm(disable=True)  # run() shows the real one
        self.clock = time.perf_counter()
        self.status_images = 0
        kill = os.environ.get(KILL_ENV, "")
        self._kill_at = tuple(int(x) for x in kill.split(":")) if kill.strip() else None
        return self.dist.device

    def resume_or_start(self, start: Callable[[], dict[str, Any]]) -> None:
        """Continue from the newest good backup of this config, or call ``start`` (the family's fresh start:
        it returns the ``started`` event's fields) and save the start backup."""
        if self.dist.is_main and (removed := self.backups.remove_partial_writes()):
            log.info("%s: removed %d temp file(s) of a save that was interrupted", self.name, removed)
        self.dist.barrier()
        backup = self.backups.latest(max_images=self.cfg.length_images)
        self.dist.barrier()  # every rank has decided before rank 0 writes the start backup
        if backup is not None:
            self.load_backup(*backup.load(self.device))
            self.event("resumed", backup=str(backup.tensors_path), from_kimg=backup.images_seen / 1000)
        else:
            self.event("started", **start())
            self.checkpoint("start")
        self.status_images = self.counters.images_seen
        # The one point that moves only when it is taken: a short cycle is due at the first rolling backup past it.
        self.next_cycle = self.cadence().next_cycle

    # ------------------------------------------------------------------------------------------- loop

    def run(self) -> dict[str, Any]:
        st, total = self.counters, self.cfg.length_images
        self.pbar = tqdm(total=total, initial=min(st.images_seen, total), unit="img", desc=self.name, disable=not (self.job.progress and self.dist.is_main), leave=False)
        self.clock, self.status_images = time.perf_counter(), st.images_seen  # for the rows' wall_s and images_per_s
        due = self.cadence()  # seen from where the run (re)starts: nothing is due before its next points
        while True:
            done = st.images_seen >= total
            if done or st.images_seen >= min(due.next_log, due.next_save):  # a row before each backup: it holds the history
                self.status()
                if self.guard.tripped:
                    due = self.rollback(f"{self.guard.longest_run} consecutive non-finite steps")
                    continue
            if not done and st.images_seen >= due.next_snapshot and self.dist.is_main:
                self.snapshot()
            if done or st.images_seen >= due.next_save:
                try:
                    backup = self.checkpoint("end" if done else "rolling")
                except ckpt.NonFiniteError as exc:  # never saved
                    due = self.rollback(f"non-finite weights ({exc})")
                    continue
                if not done and st.images_seen >= self.next_cycle:
                    self.short_cycle(backup)
            if done:
                break
            due = self.cadence()
            self._maybe_die()
            self.step()
        self.pbar.close()
        metrics = self.finish() if self.dist.is_main else {}
        self.dist.close()
        return metrics

    def _maybe_die(self) -> None:
        if self._kill_at is not None and self._kill_at == (self.dist.rank, self.step_index):
            log.warning("%s: rank %d kills itself before step %d (%s)", self.name, self.dist.rank, self.step_index, KILL_ENV)
            os.kill(os.getpid(), signal.SIGKILL)

    def sync_gradients(self, params: list[torch.nn.Parameter], loss: torch.Tensor) -> torch.Tensor:
        """Average the gradients of ``params`` and ``loss`` (0-d) over the ranks (one bucketed all-reduce,
        as DDP does after ``no_sync`` accumulation); the averaged loss, so every rank's finite flag agrees."""
        return self.dist.average_gradients(params, loss)

    def accumulate(self, parts: dict[str, torch.Tensor], finite: torch.Tensor) -> None:
        """Add a step's parts to the status sums: finite steps only (a skipped step must not turn the mean into NaN)."""
        for k, v in parts.items():
            self.sums[k] = self.sums.get(k, 0) + torch.where(finite, v, 0.0)
        self.sums["_finite_steps"] = self.sums.get("_finite_steps", 0) + finite.float()
        self.sum_steps += 1

    # --------------------------------------------------------------------------------- status, guard

    def status(self) -> None:
        """Sync once: a history row of the losses since the last status, and the NaN guard's count (``guard.tripped``)."""
        st = self.counters
        now = time.perf_counter()
        seconds, images = now - self.clock, st.images_seen - self.status_images
        st.wall_s += seconds
        self.clock, self.status_images = now, st.images_seen
        _, skipped = self.guard.check()
        if self.sum_steps:
            keys = list(self.sums)
            stacked = self.dist.average(torch.stack([torch.as_tensor(self.sums[k], device=self.device, dtype=torch.float32) for k in keys]))
            values = dict(zip(keys, stacked.tolist()))
            finite_steps = max(values.pop("_finite_steps"), 1.0)
            row = {"kimg": round(st.images_seen / 1000, self.kimg_digits), "images_seen": st.images_seen, "step": self.step_index, "wall_s": round(st.wall_s, 2)}
            row["images_per_s"] = round(images / max(seconds, 1e-9), 2)
            row.update(self.status_fields(row))
            row.update({k: v / finite_steps for k, v in values.items()})
            row["skipped_steps"] = skipped
            st.history.append(row)
            self.pbar.set_postfix(**self.postfix(row), refresh=False)
            log.debug("%s", row)
        self.sums, self.sum_steps = {}, 0

    def rollback(self, reason: str) -> Cadence:
        """Back to the last good backup with a lower LR and a higher epsilon; the cadence from there. Past
        ``guard.max_rollbacks`` (or with no backup) the run fails, naming the last good backup."""
        st, guard = self.counters, self.cfg.guard
        backup = self.backups.latest(max_images=st.images_seen)
        where = f"at {st.images_seen / 1000:g} kimg (step {self.step_index})"
        if backup is None or st.rollbacks >= guard.max_rollbacks:
            good = f"the last good backup is {backup.tensors_path} ({backup.images_seen / 1000:g} kimg)" if backup else "no good backup exists"
            self.event("failed", reason=reason, rollbacks=st.rollbacks, good_backup=str(backup.tensors_path) if backup else None)
            raise StageError(
                f"{self.kind} {self.name}: {reason} {where}, after {st.rollbacks} rollback(s) with the LR lowered to x{st.lr_scale:g} "
                f"and epsilon raised to x{st.eps_scale:g}; giving up ({self.section}.{self.name}.guard.max_rollbacks = {guard.max_rollbacks}). "
                f"Non-finite weights were never saved: {good}. Lower {self.section}.{self.name}.lr, or use precision fp32/bf16."
            )
        tensors, meta = backup.load(self.device)
        self.load_backup(tensors, meta, counters_too=False)
        st.rollbacks += 1
        st.lr_scale *= guard.lr_factor
        st.eps_scale *= guard.eps_factor
        fields = self.after_rollback()
        self.guard.reset()
        self.sums, self.sum_steps = {}, 0
        self.status_images = st.images_seen
        self.pbar.reset(total=self.cfg.length_images)
        self.pbar.update(st.images_seen)
        self.event("rollback", reason=f"{reason} {where}", backup=str(backup.tensors_path), to_kimg=backup.images_seen / 1000, **fields, lr_scale=st.lr_scale, rollbacks=st.rollbacks)
        return self.cadence()

    # ---------------------------------------------------------------------------------------- backups

    def checkpoint(self, kind: str) -> ckpt.Backup:
        """Save a backup (rank 0; the others check the same weights and wait for the file). Raises
        ``ckpt.NonFiniteError`` (nothing written, on every rank alike) for weights that hold NaN or inf."""
        seen = self.counters.images_seen
        tensors, meta = self.backup_state()
        if not self.dist.is_main:
            if bad := ckpt.nonfinite(tensors):  # identical weights on every rank: rank 0 refuses the same save
                raise ckpt.NonFiniteError(f"{len(bad)} tensor(s) hold NaN or inf, e.g. {bad[0]}")
            self.dist.barrier()
            return ckpt.Backup(kind, seen, self.backups.folder / f"{kind}-{seen:012d}.json")
        try:
            backup = self.backups.save(kind, seen, tensors, meta)
        except ckpt.SaveError as exc:  # a full disk is the user's to fix, not a bug: say so, and what is safe
            good = self.backups.latest()
            kept = f"the backups already written are intact, the newest is {good.tensors_path} ({good.images_seen / 1000:g} kimg)" if good else "no backup was written yet"
            raise StageError(f"{self.kind} {self.name}: {exc}; {kept}. Free some disk space and run the same command again: it resumes from there.") from None
        self.dist.barrier()
        return backup

    def short_cycle(self, backup: ckpt.Backup) -> None:
        """Reload what was just saved, as a restart would (the seed idea: a resume must change nothing)."""
        self.load_backup(*backup.load(self.device))
        self.next_cycle = self.cadence().next_cycle
        self.event("short_cycle", backup=str(backup.tensors_path))

    def event(self, kind: str, **fields: Any) -> None:
        """Record an event (every rank keeps the same list, which backups carry); rank 0 writes events.jsonl."""
        st = self.counters
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "stage": self.name, "event": kind, "kimg": st.images_seen / 1000, "step": self.step_index, **fields}
        st.events.append(entry)
        if self.dist.is_main:
            write_text(self.job.out_dir / "events.jsonl", "".join(json.dumps(e) + "\n" for e in st.events))
            log.log(logging.WARNING if kind in ("rollback", "failed") else logging.INFO, "%s: %s %s", self.name, kind, fields)
