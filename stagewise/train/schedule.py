"""A stage's schedule: one pure function of progress (images seen), as ProGAN's ``TrainingSchedule``.

    plan = schedule(cfg, images_seen, grew=True, lr_scale=0.5, eps_scale=10.0)
    plan.fade, plan.lr, plan.eps, plan.d_lr, plan.d_eps   # what the next step trains with
    plan.next_log, plan.next_save, plan.next_preview, plan.next_cycle   # images_seen at which each is due

The loop computes the plan before each step, steps with it, and runs whatever the step carried it to
(``images_seen >= plan.next_save``): each point is the next multiple of its interval after the plan's
``images_seen``, so what is due depends on progress alone, and a resumed or rolled-back run (a plan from
the backup's progress) does what an uninterrupted one does. The NaN guard's rollback scales are inputs:
they are state a backup carries, not progress. EMA's ramp stays with the EMA (``ema.EMA.beta``): it counts
the images the average has seen, which is the EMA's own state, not this stage's progress.
"""

from __future__ import annotations

from dataclasses import dataclass

from stagewise.train.recipe import StageConfig

NEVER = float("inf")  # a point that is never due (the interval is off)


@dataclass(frozen=True)
class Schedule:
    images_seen: int  # the progress this plan was computed at
    fade: float  # weight of the level this stage grew (1.0: fully in, and always in a stage that did not grow)
    lr: float  # the model's learning rate: warm-up ramp x NaN-rollback scale
    eps: float  # Adam's epsilon, raised by each rollback
    d_lr: float  # the discriminator's (no warm-up: a fresh D has nothing to protect)
    d_eps: float
    next_log: float  # images_seen at which the next status (history row, guard check) is due
    next_save: float  # ... the next rolling backup
    next_preview: float  # ... the next preview.png during the stage (NEVER: at the end only)
    next_cycle: float  # ... the next short cycle, taken at the first rolling backup from there (NEVER: off)


def next_point(images_seen: int, every_kimg: float | None) -> float:
    """The next multiple of ``every_kimg`` after ``images_seen`` (NEVER when ``every_kimg`` is off)."""
    if not every_kimg:
        return NEVER
    every = max(1, round(every_kimg * 1000))
    return (images_seen // every + 1) * every


def schedule(cfg: StageConfig, images_seen: int, *, grew: bool, lr_scale: float = 1.0, eps_scale: float = 1.0) -> Schedule:
    fade_images, warmup_images = cfg.fade_in_kimg * 1000, cfg.lr_warmup_kimg * 1000
    ramp = min(1.0, (images_seen + 1) / warmup_images) if warmup_images else 1.0  # + 1: the first step moves
    return Schedule(
        images_seen=images_seen,
        fade=min(1.0, images_seen / fade_images) if grew and fade_images else 1.0,
        lr=cfg.lr * lr_scale * ramp,
        eps=cfg.eps * eps_scale,
        d_lr=cfg.gan.lr * lr_scale,
        d_eps=cfg.gan.eps * eps_scale,
        next_log=next_point(images_seen, cfg.log_every_kimg),
        next_save=next_point(images_seen, cfg.save_every_kimg),
        next_preview=next_point(images_seen, cfg.preview_every_kimg),
        next_cycle=next_point(images_seen, cfg.short_cycle_kimg),
    )
