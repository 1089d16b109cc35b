"""The stage schedule: a pure function of images seen (fade, LR ramp x rollback scale, due points), and
the loop steps with what it says."""

from __future__ import annotations

import dataclasses

import pytest

from stagewise.train.loop import StageTrainer
from stagewise.train.recipe import parse_train
from stagewise.train.schedule import NEVER, next_point, schedule
from test_trainer import job, stage, train_cfg, write_cache, write_init


def cfg(**settings):
    return parse_train({"stages": {"a": stage(**settings)}}).stages["a"]


def test_due_points_are_the_next_multiples_of_each_interval():
    assert [next_point(n, 0.04) for n in (0, 8, 39, 40, 41)] == [40, 40, 40, 80, 80]  # a point reached is behind
    assert next_point(0, 0.0004) == 1  # an interval under one image is every image, never zero
    assert next_point(123, None) == NEVER
    plan = schedule(cfg(log_every_kimg=0.016, save_every_kimg=0.04, preview_every_kimg=0.1, short_cycle_kimg=0.012), 50, grew=False)
    assert (plan.next_log, plan.next_save, plan.next_preview, plan.next_cycle) == (64, 80, 100, 60)
    off = schedule(cfg(), 50, grew=False)
    assert off.next_preview == off.next_cycle == NEVER  # preview at the end only, no short cycles


def test_fade_ramps_over_fade_in_in_a_stage_that_grew():
    grown = cfg(px=32, fade_in_kimg=0.04)
    assert [schedule(grown, n, grew=True).fade for n in (0, 10, 20, 40, 400)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert schedule(grown, 0, grew=False).fade == 1.0  # nothing new to fade in
    assert schedule(cfg(px=32), 0, grew=True).fade == 1.0  # fade_in_kimg 0: the new level is in at once


def test_lr_is_the_warmup_ramp_times_the_rollback_scale():
    warm = cfg(lr=0.002, lr_warmup_kimg=0.1, eps=1e-7, gan={"lr": 1e-4})
    assert schedule(warm, 0, grew=False).lr == pytest.approx(0.002 / 100)  # the first step moves
    assert schedule(warm, 49, grew=False).lr == pytest.approx(0.001)
    assert schedule(warm, 99, grew=False).lr == schedule(warm, 5000, grew=False).lr == pytest.approx(0.002)
    after = schedule(warm, 49, grew=False, lr_scale=0.25, eps_scale=100.0)
    assert (after.lr, after.eps) == (pytest.approx(0.00025), pytest.approx(1e-5))
    assert (after.d_lr, after.d_eps) == (pytest.approx(1e-4 * 0.25), pytest.approx(warm.gan.eps * 100))  # D: no warm-up
    assert schedule(cfg(lr=0.002), 0, grew=False).lr == 0.002  # no warm-up: the configured LR from the first step


def test_the_plan_is_a_pure_frozen_value():
    c = cfg(lr_warmup_kimg=0.1, short_cycle_kimg=0.02)
    assert schedule(c, 48, grew=True, lr_scale=0.5) == schedule(c, 48, grew=True, lr_scale=0.5)  # resume-safe
    with pytest.raises(dataclasses.FrozenInstanceError):
        schedule(c, 48, grew=True).lr = 1.0  # type: ignore[misc]


def test_the_step_trains_with_the_schedule(tmp_path):
    write_cache(tmp_path / "cache", 32, per_domain=3)
    write_init(tmp_path / "runs" / "init")
    train = train_cfg({"g": stage(px=32, fade_in_kimg=0.04, lr_warmup_kimg=0.08, batch_size=2)})
    trainer = StageTrainer(job(tmp_path, "g", train))
    for _step in range(2):
        plan = schedule(trainer.cfg, trainer.state.images_seen, grew=True)
        trainer.step()
        assert trainer.model.fade == plan.fade < 1.0
        assert [g["lr"] for g in trainer.state.opt.param_groups] == [plan.lr]
        assert [g["eps"] for g in trainer.state.opt.param_groups] == [plan.eps]
    assert trainer.state.opt.param_groups[0]["lr"] == pytest.approx(train.stages["g"].lr * 5 / 80)  # (4 + 1) / 80 of the ramp
