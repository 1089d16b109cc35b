"""One training stage: parent model in, ``runs/<stage>/`` out. To resume, run the same command again.

The loop (``runner.Runner.run``, shared with the diffusion phases) is edm2's: status -> snapshot ->
checkpoint -> done -> step, with progress counted in images (both domains together). What is due when is
the schedule's (``schedule.schedule``: a pure function of images seen); the loop only reads it. The runner
owns status, rollback, checkpoint, short cycles and events; this family supplies the rest, each a short
method doing one thing:

    setup      load the parent, grow it if the stage doubles the resolution, freeze, load the cache,
               resume from the newest good backup of the same config (or save the ``start`` backup)
    step       the schedule's fade / LR, per domain a batch (flip), one affine for input and target and
               the smooth warp on the input only (augment.py), autocast forward, losses (+ GAN), backward, unscale / clip, one optimizer step that a non-finite
               loss or gradient skips on the device, LRD around it, EMA after it
    snapshot   preview.png during the stage
    finish     preview.png, metrics.json, history.tsv, model.safetensors + meta.json, events.jsonl
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from stagewise.cli import StageError
from stagewise.code import code_fingerprint
from stagewise.codecs import CodecConfig, load_codec
from stagewise.config import fingerprint
from stagewise.device import pick_device
from stagewise.io import sha256_file, write_json, write_text
from stagewise.models.autoencoder import DOMAINS, grow
from stagewise.train import checkpoint as ckpt
from stagewise.train.data import StageData, mix_seed
from stagewise.train.dist import batch_split_error
from stagewise.train.freeze import FreezeError, Trainable, resolve
from stagewise.train.gan import d_loss, frozen, g_loss
from stagewise.train.guard import NanGuard, skip_if_not_finite
from stagewise.train.losses import reconstruction_loss
from stagewise.train.masked import flip_with_masks, masked_reconstruction
from stagewise.train.metrics import evaluate
from stagewise.train.preview import write_preview
from stagewise.train.recipe import INIT, StageConfig, TrainConfig, stage_error
from stagewise.train.runner import Cadence, Runner
from stagewise.train.schedule import Schedule, schedule
from stagewise.train.state import TrainState
from stagewise.train.augment import augment
from stagewise.train.warp import random_flip

log = logging.getLogger(__name__)
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class StageJob:
    """Where a stage reads and writes (paths come from dvc.yaml, settings from params.yaml)."""

    name: str
    train: TrainConfig
    codec: CodecConfig
    parent_dir: Path  # runs/<parent>
    cache_dir: Path  # data/cache/<resolution_px>
    out_dir: Path  # runs/<stage>
    backups_dir: Path  # runs/<stage>/backups (DVC persist: survives reruns)
    progress: bool = True
    parent_cache_dir: Path | None = None  # data/cache/<resolution_px / 2>: a growth stage's fade-in reads real half-size latents there

    @property
    def cfg(self) -> StageConfig:
        return self.train.stages[self.name]


class StageTrainer(Runner):
    def __init__(self, job: StageJob):
        self.job, self.cfg, self.name = job, job.cfg, job.name
        cfg = self.cfg
        self.device = self.init_runner(pick_device(job.train.device))
        if error := batch_split_error(cfg.batch_size, self.dist.world, "train.devices"):
            raise stage_error(self.name, "batch_size", error)
        self.codec = load_codec(job.codec, self.device)
        self.model, parent_meta = self._load_parent()
        self.grew = self.model.resolution_px == 2 * parent_meta["architecture"]["resolution_px"]
        self.trainable = self._freeze()
        self.data = StageData(job.cache_dir, self.codec, cfg.resolution_px, cfg.holdout_per_domain, cfg.flip, cfg.seed, self.device, half_dir=self._half_cache())
        expected = (self.model.channels, self.model.latent_px, self.model.latent_px)
        if self.data.latent_shape != expected:
            raise StageError(f"{job.cache_dir}: latents are {self.data.latent_shape}, the model at {cfg.resolution_px} px expects {expected}")
        if cfg.flip and not self.data.has_flipped and not self.codec.mirror_is_exact:
            raise stage_error(self.name, "flip", f"{job.cache_dir} has no mirrored rows, and mirroring a {self.codec.name} latent is not the latent of the mirrored image; set cache.flip: true (and rerun the cache stage) or train.stages.{self.name}.flip: false")
        self.flip_on_the_fly = cfg.flip and not self.data.has_flipped  # exact for this codec (pixels)
        self.state = TrainState(self.model, cfg, self.trainable, self.device)
        self.guard = NanGuard(self.device, cfg.guard.max_bad_steps)
        self.gen = torch.Generator(device=self.device)  # reseeded every step from (seed, step)
        self.encode, self.decode = self.model.encode, self.model.decode
        if job.train.compile:
            self.encode, self.decode = torch.compile(self.model.encode), torch.compile(self.model.decode)
        self.parent_sha256 = sha256_file(job.parent_dir / ckpt.MODEL_FILE)
        self.parent_meta = parent_meta
        self.fingerprint = fingerprint(cfg.resume_fingerprint_fields(), self.codec.id, self.codec.shift, self.codec.scale, self.parent_sha256, self.data.fingerprint, code_fingerprint())
        self.backups = ckpt.Backups(job.backups_dir, self.fingerprint, cfg.backups_kept)
        self.counters = self.state  # the runner's images_seen, scales, rollbacks, wall_s, history, events
        self.resume_or_start(self._start)

    # ------------------------------------------------------------------------------------------ setup

    def _load_parent(self):
        job, cfg = self.job, self.cfg
        try:
            model, meta = ckpt.load_model(job.parent_dir, self.device)
        except FileNotFoundError as exc:
            what = "the init stage (`dvc repro init`)" if self.cfg.parent == INIT else f"stage {cfg.parent} (`dvc repro train@{cfg.parent}`)"
            raise StageError(f"{exc} — run {what} first") from None
        if meta.get("codec_id") != self.codec.id:
            raise StageError(f"{job.parent_dir}: the parent model was trained on codec {meta.get('codec_id')}, this run uses {self.codec.id}; rerun from init")
        parent_px = model.resolution_px
        if cfg.resolution_px == 2 * parent_px:
            model = grow(model)
        elif cfg.resolution_px != parent_px:
            raise stage_error(self.name, "resolution_px", f"{cfg.resolution_px} is neither the parent's ({cfg.parent}: {parent_px} px) nor twice it")
        return model, meta

    def _half_cache(self) -> Path | None:
        """The half-size cache a fade-in reads (None: no fade-in, or pixels, where pooling is the downsized image)."""
        if not (self.grew and self.cfg.fade_in_kimg > 0):
            return None
        half = self.job.parent_cache_dir
        if half is None and not self.codec.mirror_is_exact:
            raise stage_error(self.name, "fade_in_kimg", f"the fade-in on {self.codec.name} blends the parent's path on the real latents of the half-size images, but no cache at {self.cfg.resolution_px // 2} px was given; set fade_in_kimg: 0 or add that resolution to cache.resolutions")
        return half

    def _freeze(self) -> Trainable:
        try:
            return resolve(self.model, self.cfg.freeze, old=self.model.old_names())
        except FreezeError as exc:
            raise stage_error(self.name, "freeze", str(exc)) from None

    def _start(self) -> dict[str, Any]:
        """A fresh stage (no backup to resume): carry the parent's optimizer state; the ``started`` event's fields."""
        freeze_changed = sorted(self.cfg.freeze) != sorted(self.parent_meta.get("config", {}).get("freeze", []))
        # DFL keeps Adam's moments (and EMA, D) across stage switches; a fresh Adam would move every weight by ~lr at once
        carry = None if self.cfg.reset_optimizer else ckpt.load_carry(self.job.parent_dir, self.device)
        carried = self.state.carry_from(carry) if carry else {}
        return dict(grew=self.grew, frozen_tensors=len(self.trainable.frozen), trainable_tensors=len(self.trainable.params), freeze_changed=freeze_changed, carried=carried)

    # ------------------------------------------------------------------------- the runner's interface

    @property
    def step_index(self) -> int:
        return self.state.step

    def cadence(self) -> Cadence:
        plan = self.plan()
        return Cadence(plan.next_log, plan.next_save, plan.next_preview, plan.next_cycle)

    def backup_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return self.state.tensors(), {**self.state.meta(), "stage": self.name}

    def load_backup(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], counters_too: bool = True) -> None:
        self.state.load(tensors, meta, counters_too=counters_too)

    def status_fields(self, row: dict[str, Any]) -> dict[str, Any]:
        return {"lr": self.plan().lr}

    def postfix(self, row: dict[str, Any]) -> dict[str, str]:
        return {"loss_a": f"{row.get('loss_a', float('nan')):.4f}", "loss_b": f"{row.get('loss_b', float('nan')):.4f}"}

    def after_rollback(self) -> dict[str, Any]:
        plan = self.plan()
        return {"lr": plan.lr, "eps": plan.eps}

    # ------------------------------------------------------------------------------------------- loop

    def plan(self) -> Schedule:
        """The plan at the current progress (and this run's NaN-rollback scales)."""
        st = self.state
        return schedule(self.cfg, st.images_seen, grew=self.grew, lr_scale=st.lr_scale, eps_scale=st.eps_scale)

    def step(self, plan: Schedule | None = None) -> None:
        st, cfg, model = self.state, self.cfg, self.model
        plan = self.plan() if plan is None else plan
        batch, accum = cfg.batch_size, cfg.grad_accum
        self.gen.manual_seed(mix_seed(cfg.seed, st.step, 1))
        model.fade = plan.fade
        encode, decode = (self.encode, self.decode) if model.fade == 1.0 else (model.encode, model.decode)  # fade changes every step: no recompiles
        st.apply(plan)
        poison = self.guard.poisoned(st.step)
        st.opt.zero_grad(set_to_none=True)
        if st.d_opt is not None:
            st.d_opt.zero_grad(set_to_none=True)
        parts: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=self.device)
        for micro in range(accum):
            position = (st.step * accum + micro) * batch
            fading = model.fade < 1.0 and self.data.has_half  # blend the parent's path on real half-size latents
            batches = [self.data.batch(d, position, batch, with_half=fading) for d in DOMAINS]
            sample, half = (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])) if fading else (torch.cat(batches), None)
            masks = torch.cat([self.data.mask_batch(d, position, batch) for d in DOMAINS]) if cfg.masked_training or cfg.eyes_mouth_prio else None
            if self.flip_on_the_fly:
                sample, masks = flip_with_masks(random_flip, sample, masks, self.gen)
            if poison:
                sample = sample * float("nan")
            channels = sample.shape[1]  # the face masks ride along as extra channels: they move with the target's affine
            stacked = sample if masks is None else torch.cat([sample, masks.to(sample.dtype)], 1)
            aug = augment(stacked, self.gen, cfg.warp, cfg.random_warp, half)  # DFL: one affine for both, the field on the input
            # under DDP: this rank's rows of the global batch, drawn and augmented as one process would
            source, target, source_half, target_half = (None if x is None else self.dist.split(x, len(DOMAINS)) for x in (aug.source, aug.target, aug.source_half, aug.target_half))
            if masks is not None:
                source, target, masks = source[:, :channels], target[:, :channels], target[:, channels:]
            with self.autocast():
                features = encode(source, source_half) if fading else encode(source)
                decoded = [decode(h, d, with_parent=True) if fading else decode(h, d) for h, d in zip(features.chunk(2), DOMAINS)]
                pred = torch.cat([y[0] for y in decoded]) if fading else torch.cat(decoded)
            loss = torch.zeros((), device=self.device)
            for i, (d, p, t) in enumerate(zip(DOMAINS, pred.chunk(2), target.chunk(2))):
                if masks is None:
                    rec, rec_parts = reconstruction_loss(p, t, cfg.loss)
                else:  # faces: DFL's masked training / eyes and mouth priority
                    rec, rec_parts = masked_reconstruction(p, t, masks.chunk(2)[i], cfg.loss, cfg.masked_training, cfg.eyes_mouth_prio)
                if fading:  # ProGAN's blend, as a blend of the two paths' losses against real latents of their size
                    rec_half, _ = reconstruction_loss(decoded[i][1], target_half.chunk(2)[i], cfg.loss)
                    rec = model.fade * rec + (1.0 - model.fade) * rec_half
                loss = loss + rec
                self._add(parts, {f"loss_{d}": rec.detach(), **{f"{d}_{k}": v for k, v in rec_parts.items()}}, accum)
            if st.disc is not None:
                with self.autocast():
                    loss_d = d_loss(st.disc(target), st.disc(pred.detach()), cfg.gan.loss)
                    with frozen(st.disc):
                        loss_g = g_loss(st.disc(pred), cfg.gan.loss)
                loss = loss + cfg.gan_power * loss_g + loss_d  # loss_d reaches only D, loss_g only G
                self._add(parts, {"gan_d": loss_d.detach(), "gan_g": loss_g.detach()}, accum)
            st.scaler.scale(loss / accum).backward()
            total = total + loss.detach()
        total = self.sync_gradients(self.trainable.params + (list(st.disc.parameters()) if st.disc is not None else []), total)
        finite, grad_norm = self._optimizer_step(total)
        parts["grad_norm"] = grad_norm
        if st.ema is not None:
            st.ema.update(model, 2 * batch * accum)
        self.guard.observe(finite)
        self.accumulate(parts, finite)
        st.step += 1
        st.images_seen += 2 * batch * accum
        self.pbar.update(2 * batch * accum)

    def _optimizer_step(self, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscale, clip and step. Returns the device flag ``finite`` (False: the step was skipped) and the
        model's gradient norm before clipping."""
        st, cfg = self.state, self.cfg
        optimizers = [st.opt] + ([st.d_opt] if st.d_opt is not None else [])
        if st.scaler.is_enabled():
            for opt in optimizers:
                st.scaler.unscale_(opt)
        finite = torch.isfinite(loss)
        norms = []
        for params in [self.trainable.params] + ([list(st.disc.parameters())] if st.disc is not None else []):
            grads = [p.grad for p in params if p.grad is not None]
            if cfg.clip_grad:
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad, foreach=True)
            else:
                norm = torch.nn.utils.get_total_norm(grads, foreach=True)
            norms.append(norm)
            if not st.scaler.is_enabled():  # fp16: overflowing gradients are the scaler's business, not a NaN
                finite = finite & torch.isfinite(norm)

        def step(opt: torch.optim.Optimizer):
            if st.scaler.is_enabled():
                return lambda: st.scaler.step(opt)  # skips on overflow, on the device (fused Adam)
            return lambda: skip_if_not_finite(opt, finite)

        if st.lrd is not None:
            st.lrd.generator.manual_seed(mix_seed(cfg.seed, st.step, 2))
            st.lrd.step(st.opt, step_fn=step(st.opt))
        else:
            step(st.opt)()
        if st.d_opt is not None:
            step(st.d_opt)()
        if st.scaler.is_enabled():
            st.scaler.update()
        return finite, norms[0].float()

    @staticmethod
    def _add(acc: dict[str, torch.Tensor], values: dict[str, torch.Tensor], accum: int) -> None:
        for k, v in values.items():
            acc[k] = acc.get(k, 0) + v.float() / accum

    def autocast(self):
        if self.cfg.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AUTOCAST[self.cfg.precision])

    # -------------------------------------------------------------------------------------- snapshot

    def snapshot(self) -> None:
        with self.output_weights():
            write_preview(self.job.out_dir / "preview.png", self.model, self.codec, self.preview_sources())

    # ----------------------------------------------------------------------------------------- finish

    @contextlib.contextmanager
    def output_weights(self):
        """The model with the weights this stage publishes: the EMA's when configured."""
        st = self.state
        if st.ema is not None and self.cfg.ema.use_for_output:
            with st.ema.applied(self.model):
                yield self.model
        else:
            yield self.model

    def preview_sources(self) -> dict[str, torch.Tensor]:
        return {d: self.data.first(d, self.cfg.preview_rows) for d in DOMAINS}

    def finish(self) -> dict[str, Any]:
        st, cfg, out = self.state, self.cfg, self.job.out_dir
        split = "heldout" if all(d in self.data.heldout for d in DOMAINS) else "train"
        eval_images = {d: self.data.first(d, 64, heldout=split == "heldout") for d in DOMAINS}
        self.model.fade = 1.0
        with self.output_weights():
            write_preview(out / "preview.png", self.model, self.codec, self.preview_sources())
            metrics = evaluate(self.model, self.codec, eval_images, cfg.loss, split)
            weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        last = st.history[-1] if st.history else {}
        metrics["train"] = {k: last[k] for k in last if k.startswith(("loss_", "gan_"))}
        metrics.update(images_seen=st.images_seen, kimg=st.images_seen / 1000, wall_s=round(st.wall_s, 1), rollbacks=st.rollbacks)
        write_json(out / "metrics.json", metrics)
        write_history(out / "history.tsv", st.history)
        end = self.backups.latest()
        meta = {
            "stage": self.name,
            "parent": cfg.parent,
            "parent_sha256": self.parent_sha256,
            "codec_id": self.codec.id,
            "codec": {"name": self.job.codec.name, "shift": self.codec.shift, "scale": self.codec.scale},
            "resolution_px": cfg.resolution_px,
            "latent_px": self.model.latent_px,
            "grew": self.grew,
            "images_seen": st.images_seen,
            "steps": st.step,
            "wall_s": round(st.wall_s, 1),
            "rollbacks": st.rollbacks,
            "ema_weights": st.ema is not None and cfg.ema.use_for_output,
            "frozen": sorted(self.trainable.frozen),
            "config": cfg.model_dump(mode="json"),
            "fingerprint": self.fingerprint,
            # Random streams are seeded from (config.seed, step), so the step is the whole rng state.
            "rng": {"seed": cfg.seed, "step": st.step},
            "end_backup": str(end.tensors_path) if end else None,
            "device": str(self.device),
        }
        ckpt.save_tensors(out / ckpt.CARRY_FILE, st.carry_tensors())  # before meta.json, the completion marker
        ckpt.save_model(out, self.model, meta, state=weights)
        removed = self.backups.prune_other_fingerprints()
        if removed:
            log.info("%s: removed stale backups of earlier configs: %s", self.name, ", ".join(p.name for p in removed))
        self.event("finished", kimg_total=st.images_seen / 1000, wall_s=round(st.wall_s, 1))
        return metrics


HISTORY_FIRST = ["kimg", "images_seen", "step", "wall_s", "images_per_s", "lr", "skipped_steps", "loss_a", "loss_b"]


def write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    """history.tsv for `dvc plots`: progress columns first, then every loss part in name order."""
    present = {k for row in rows for k in row}
    columns = [c for c in HISTORY_FIRST if c in present] + sorted(present - set(HISTORY_FIRST))

    def fmt(v: Any) -> str:
        return "" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v)

    lines = ["\t".join(columns)] + ["\t".join(fmt(row.get(c)) for c in columns) for row in rows]
    write_text(path, "\n".join(lines) + "\n")


def run_stage(job: StageJob) -> dict[str, Any]:
    trainer = StageTrainer(job)  # every check (params, parent, freeze patterns, cache) before --out is created
    job.out_dir.mkdir(parents=True, exist_ok=True)
    return trainer.run()
