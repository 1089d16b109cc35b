"""One diffusion phase: the parent's UNet in, ``runs/<phase>/`` out. To resume, run the same command again.

The loop is the autoencoder trainer's (status -> validation -> checkpoint -> done -> step, progress in
images) on the same shared pieces: ``Backups`` (atomic safetensors + JSON, rolling + start/end),
``NanGuard`` / ``skip_if_not_finite`` (a non-finite step is skipped, a run of them rolls back to the last
good backup with a lower LR), ``EMA`` (half-life in kimg). Every random draw -- rows, timesteps, noise,
offset noise, caption dropout -- is seeded from (phase seed, step, micro-batch), and the LR is a function
of the images seen, so the step number is the whole random state and a resumed phase is bit-identical.

    step      rows -> latents (normalised at load) -> noise (+ offset noise), timesteps -> noisy latents;
              captions (dropped to "" with the row's subset's chance) -> frozen text embeddings; UNet
              (autocast, optional gradient checkpointing) -> epsilon or v target -> MSE per row x min-SNR-γ
              weight x subset loss weight; backward over grad_accum micro-batches; unscale, clip, step; EMA
    finish    validation grid (raw + EMA), samples.png, metrics.json, history.tsv, unet.safetensors + unet.json
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from stagewise.cli import StageError
from stagewise.code import DIFFUSE_CODE, code_fingerprint
from stagewise.codecs import CodecConfig, load_codec
from stagewise.config import fingerprint
from stagewise.device import pick_device
from stagewise.diffusion import model as dm
from stagewise.diffusion.config import DiffusionConfig, PhaseConfig, phase_error
from stagewise.diffusion.data import PhaseData
from stagewise.diffusion.optim import load_optimizer_state, lr_factor, make_optimizer, optimizer_state
from stagewise.diffusion.validate import sample_latents, target_for, validation_loss, write_samples
from stagewise.io import sha256_file, write_json, write_text
from stagewise.train import checkpoint as ckpt
from stagewise.train.data import mix_seed
from stagewise.train.ema import EMA
from stagewise.train.guard import NanGuard, skip_if_not_finite
from stagewise.train.loop import write_history  # the autoencoder loop's history.tsv writer
from stagewise.train.schedule import next_point  # the cadence: the next multiple of an interval in images
from stagewise.train.recipe import INIT

log = logging.getLogger(__name__)
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class PhaseJob:
    """Where a phase reads and writes (paths from dvc.yaml, settings from params.yaml)."""

    name: str
    diffusion: DiffusionConfig
    codec: CodecConfig
    parent_dir: Path  # runs/<parent> (runs/init for the first phase): unet.safetensors + unet.json
    text_dir: Path  # runs/init/text: the frozen text encoder and tokenizer
    cache_dir: Path  # data/cache/<resolution_px>
    out_dir: Path  # runs/<phase>
    backups_dir: Path  # runs/<phase>/backups (DVC persist)
    progress: bool = True

    @property
    def cfg(self) -> PhaseConfig:
        return self.diffusion.stages[self.name]


def load_unet(folder: Path, device: torch.device):
    """(unet, meta) from ``folder``/unet.safetensors + unet.json (written by diffuse_init or a phase)."""
    meta_path, weights = folder / dm.UNET_META, folder / dm.UNET_FILE
    if not meta_path.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{folder}: no {dm.UNET_FILE} + {dm.UNET_META}")
    meta = json.loads(meta_path.read_text())
    unet = dm.unet_from_config(meta["unet_config"])
    unet.load_state_dict(load_file(str(weights)))
    return unet.to(device), meta


def save_unet(folder: Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    ckpt.save_tensors(folder / dm.UNET_FILE, state)  # refuses non-finite weights
    write_json(folder / dm.UNET_META, meta)


class PhaseTrainer:
    def __init__(self, job: PhaseJob):
        from diffusers import DDPMScheduler

        self.job, self.cfg, self.name = job, job.cfg, job.name
        cfg = self.cfg
        self.device = pick_device(job.diffusion.device)
        self.codec = load_codec(job.codec, self.device)
        try:
            self.unet, self.parent_meta = load_unet(job.parent_dir, self.device)
        except FileNotFoundError as exc:
            what = "`dvc repro diffuse_init`" if cfg.parent == INIT else f"`dvc repro diffuse@{cfg.parent}`"
            raise StageError(f"{exc} — run {what} first") from None
        if self.parent_meta["codec_id"] != self.codec.id:
            raise StageError(f"{job.parent_dir}: the UNet was made for codec {self.parent_meta['codec_id']}, the codec section gives {self.codec.id}; rerun from diffuse_init")
        self.data = PhaseData(job.cache_dir, self.codec, cfg, self.name, self.device)
        channels, latent_px = self.data.latent_shape[0], self.data.latent_shape[-1]
        if self.unet.config.in_channels != channels:
            raise StageError(f"{job.cache_dir}: latents have {channels} channels, the UNet takes {self.unet.config.in_channels}")
        levels = 2 ** (len(self.unet.config.block_out_channels) - 1)
        if latent_px % levels:
            raise phase_error(self.name, "resolution_px", f"{cfg.resolution_px} px gives {latent_px} latent px, not a multiple of the UNet's {levels}x down-sampling")
        self.text_encoder, self.tokenizer = dm.load_text(job.text_dir, self.device)
        dm.check_cross_attention(self.unet, self.text_encoder)
        self.embeddings = dm.embed_captions(self.text_encoder, self.tokenizer, self.data.captions, self.device)
        self.empty = self.data.captions.index("")
        self.scheduler_config = self.parent_meta["scheduler"]
        self.scheduler = DDPMScheduler.from_config(self.scheduler_config, prediction_type=cfg.prediction, rescale_betas_zero_snr=cfg.zero_terminal_snr)
        self.scheduler.alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device)
        self.num_timesteps = self.scheduler.config.num_train_timesteps
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.unet.train().requires_grad_(True)
        self.names = [n for n, _ in self.unet.named_parameters()]
        self.opt = make_optimizer(list(self.unet.parameters()), cfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.ema = EMA(self.unet, cfg.ema_halflife_kimg, cfg.ema_rampup_ratio) if cfg.ema_halflife_kimg else None
        self.guard = NanGuard(self.device)
        self.gen = torch.Generator(device=self.device)
        self.images_seen = self.step_count = self.rollbacks = 0
        self.lr_scale = self.eps_scale = 1.0
        self.wall_s = 0.0
        self.history: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.sums: dict[str, torch.Tensor] = {}
        self.sum_steps = 0
        self.pbar = tqdm(disable=True)  # run() shows the real one
        self.clock = time.perf_counter()
        self.parent_sha256 = sha256_file(job.parent_dir / dm.UNET_FILE)
        self.fingerprint = fingerprint(cfg.resume_fingerprint_fields(), self.codec.id, self.codec.shift, self.codec.scale, self.parent_sha256, self.data.fingerprint, code_fingerprint(DIFFUSE_CODE))
        self.backups = ckpt.Backups(job.backups_dir, self.fingerprint, cfg.backups_kept)
        self._resume_or_start()
        self.last_status = self.last_save = self.last_val = self.images_seen

    # ---------------------------------------------------------------------------------- state, resume

    def apply_hparams(self) -> None:
        lr = self.cfg.lr * self.lr_scale * lr_factor(self.images_seen, self.cfg)
        for group in self.opt.param_groups:
            group["lr"] = lr
            if "eps" in group:
                group["eps"] = self.cfg.eps * self.eps_scale

    def tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        out = {f"unet.{k}": v for k, v in self.unet.state_dict().items()}
        opt_tensors, opt_meta = optimizer_state(self.opt, self.names)
        out.update(opt_tensors)
        if self.ema is not None:
            out.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        meta = {"images_seen": self.images_seen, "step": self.step_count, "lr_scale": self.lr_scale, "eps_scale": self.eps_scale, "rollbacks": self.rollbacks,
                "wall_s": self.wall_s, "optimizer": opt_meta, "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
                "history": self.history, "events": self.events, "phase": self.name}
        return out, meta

    def load(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], counters_too: bool = True) -> None:
        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}

        self.unet.load_state_dict(part("unet"))
        load_optimizer_state(self.opt, self.names, tensors, meta["optimizer"])
        if self.ema is not None:
            self.ema.load_state_dict(part("ema"))
        if self.scaler.is_enabled() and meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        self.images_seen, self.step_count = meta["images_seen"], meta["step"]
        if counters_too:
            self.lr_scale, self.eps_scale, self.rollbacks, self.wall_s = meta["lr_scale"], meta["eps_scale"], meta["rollbacks"], meta["wall_s"]
            self.history, self.events = list(meta["history"]), list(meta["events"])
        else:
            self.history = [row for row in self.history if row["images_seen"] <= self.images_seen]
        self.apply_hparams()

    def _resume_or_start(self) -> None:
        if removed := self.backups.remove_partial_writes():
            log.info("%s: removed %d temp file(s) of an interrupted save", self.name, removed)
        backup = self.backups.latest(max_images=self.cfg.length_images)
        if backup is not None:
            self.load(*backup.load(self.device))
            self.event("resumed", backup=str(backup.tensors_path), from_kimg=backup.images_seen / 1000)
        else:
            self.event("started", parent=self.cfg.parent, rows=len(self.data.latents), subsets=self.data.counts, optimizer=self.cfg.optimizer)
            self.apply_hparams()
            self.checkpoint("start")

    # ------------------------------------------------------------------------------------------- loop

    def run(self) -> dict[str, Any]:
        cfg, total = self.cfg, self.cfg.length_images
        self.pbar = tqdm(total=total, initial=min(self.images_seen, total), unit="img", desc=self.name, disable=not self.job.progress, leave=False)
        self.clock = time.perf_counter()
        while True:
            done = self.images_seen >= total
            if (done or self.images_seen >= next_point(self.last_status, cfg.log_every_kimg)) and self.status():
                continue
            if not done and self.images_seen >= next_point(self.last_val, cfg.validation.every_kimg):
                self.last_val = self.images_seen
                if self.history:
                    self.history[-1].update(self.validate_flat())
            if (done or self.images_seen >= next_point(self.last_save, cfg.save_every_kimg)) and self.checkpoint("end" if done else "rolling"):
                continue
            if done:
                break
            self.step()
        self.pbar.close()
        return self.finish()

    def autocast(self):
        if self.cfg.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AUTOCAST[self.cfg.precision])

    def snr_weight(self, t: torch.Tensor) -> torch.Tensor:
        """min-SNR-γ (Hang et al. 2023): min(SNR, γ) / SNR for epsilon, / (SNR + 1) for v. Zero-terminal
        SNR makes SNR(T) = 0: the epsilon form's 0 / 0 is taken as 0 (pure noise predicts noise trivially)."""
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.scheduler, t).float()
        clipped = torch.minimum(snr, torch.full_like(snr, self.cfg.snr_gamma))
        if self.cfg.prediction == "v_prediction":
            return clipped / (snr + 1)
        return clipped / snr.clamp_min(1e-8)

    def draw(self, rows: torch.Tensor, micro: int, poison: bool = False) -> dict[str, torch.Tensor]:
        """One micro-batch's inputs: clean latents, noise (+ offset noise), timesteps, caption indices
        (dropped ones point at ""); every draw seeded from (seed, step, micro)."""
        cfg, data = self.cfg, self.data
        self.gen.manual_seed(mix_seed(cfg.seed, self.step_count, micro, 1))
        x0 = data.batch(rows)
        if poison:
            x0 = x0 * float("nan")
        n = len(rows)
        noise = torch.randn(x0.shape, generator=self.gen, device=self.device)
        if cfg.offset_noise:  # zero-frequency noise: lets the model change an image's mean brightness
            noise = noise + cfg.offset_noise * torch.randn((n, x0.shape[1], 1, 1), generator=self.gen, device=self.device)
        t = torch.randint(0, self.num_timesteps, (n,), generator=self.gen, device=self.device)
        keep = torch.rand(n, generator=self.gen, device=self.device) >= data.dropout[rows]
        return {"x0": x0, "noise": noise, "t": t, "caption": torch.where(keep, data.caption_index[rows], self.empty), "weight": data.loss_weight[rows]}

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return target_for(self.scheduler, self.cfg.prediction, x0, noise, t)

    def loss(self, d: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weighted loss of one micro-batch (a 0-d tensor)."""
        x0, noise, t = d["x0"], d["noise"], d["t"]
        noisy = self.scheduler.add_noise(x0, noise, t)
        with self.autocast():
            pred = self.unet(noisy, t, self.embeddings[d["caption"]]).sample
        per_row = (pred.float() - self.target(x0, noise, t)).pow(2).mean(dim=(1, 2, 3))
        weight = d["weight"]
        if self.cfg.snr_gamma is not None:
            weight = weight * self.snr_weight(t)
        return (per_row * weight).mean()

    def step(self) -> None:
        cfg = self.cfg
        batch, accum = cfg.batch_size, cfg.grad_accum
        self.apply_hparams()
        poison = self.guard.poisoned(self.step_count)
        self.opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        epoch = 0
        for micro in range(accum):
            rows, e = self.data.indices((self.step_count * accum + micro) * batch, batch)
            epoch = epoch if micro else e
            loss = self.loss(self.draw(rows, micro, poison))
            self.scaler.scale(loss / accum).backward()
            total = total + loss.detach() / accum
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.opt)
        params = [p for p in self.unet.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad, foreach=True) if cfg.clip_grad else torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        finite = torch.isfinite(total)
        if self.scaler.is_enabled():
            self.scaler.step(self.opt)  # skips on overflow
            self.scaler.update()
        else:
            finite = finite & torch.isfinite(norm)
            skip_if_not_finite(self.opt, finite)
        if self.ema is not None:
            self.ema.update(self.unet, batch * accum)
        self.guard.observe(finite)
        for k, v in {"loss": total, "grad_norm": norm.float()}.items():
            self.sums[k] = self.sums.get(k, 0) + torch.where(finite, v, 0.0)
        self.sums["_finite_steps"] = self.sums.get("_finite_steps", 0) + finite.float()
        self.sum_steps += 1
        self.epoch = epoch
        self.step_count += 1
        self.images_seen += batch * accum
        self.pbar.update(batch * accum)

    # ------------------------------------------------------------------------------ status, guard, save

    def status(self) -> bool:
        """Sync once: a history row, and the NaN guard's verdict. True when it rolled back."""
        now = time.perf_counter()
        seconds, images = now - self.clock, self.images_seen - self.last_status
        self.wall_s += seconds
        self.clock, self.last_status = now, self.images_seen
        longest, skipped = self.guard.check()
        if self.sum_steps:
            keys = list(self.sums)
            values = dict(zip(keys, torch.stack([torch.as_tensor(self.sums[k], device=self.device, dtype=torch.float32) for k in keys]).tolist()))
            finite_steps = max(values.pop("_finite_steps"), 1.0)
            row = {"kimg": round(self.images_seen / 1000, 4), "images_seen": self.images_seen, "step": self.step_count, "epoch": getattr(self, "epoch", 0),
                   "wall_s": round(self.wall_s, 2), "images_per_s": round(images / max(seconds, 1e-9), 2),
                   "lr": self.cfg.lr * self.lr_scale * lr_factor(self.images_seen, self.cfg), "skipped_steps": skipped}
            row.update({k: v / finite_steps for k, v in values.items()})
            self.history.append(row)
            self.pbar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
        self.sums, self.sum_steps = {}, 0
        if longest >= self.cfg.guard.max_bad_steps:
            self.rollback(f"{longest} consecutive non-finite steps")
            return True
        return False

    def rollback(self, reason: str) -> None:
        guard = self.cfg.guard
        backup = self.backups.latest(max_images=self.images_seen)
        where = f"at {self.images_seen / 1000:g} kimg (step {self.step_count})"
        if backup is None or self.rollbacks >= guard.max_rollbacks:
            good = f"the last good backup is {backup.tensors_path} ({backup.images_seen / 1000:g} kimg)" if backup else "no good backup exists"
            self.event("failed", reason=reason, rollbacks=self.rollbacks)
            raise StageError(f"phase {self.name}: {reason} {where}, after {self.rollbacks} rollback(s) with the LR lowered to x{self.lr_scale:g}; giving up "
                             f"(diffusion.stages.{self.name}.guard.max_rollbacks = {guard.max_rollbacks}). Non-finite weights were never saved: {good}. "
                             f"Lower diffusion.stages.{self.name}.lr, or use precision fp32/bf16.")
        self.load(*backup.load(self.device), counters_too=False)
        self.rollbacks += 1
        self.lr_scale *= guard.lr_factor
        self.eps_scale *= guard.eps_factor
        self.apply_hparams()
        self.guard.reset()
        self.last_status = self.last_save = self.last_val = self.images_seen
        self.pbar.reset(total=self.cfg.length_images)
        self.pbar.update(self.images_seen)
        self.event("rollback", reason=f"{reason} {where}", backup=str(backup.tensors_path), to_kimg=backup.images_seen / 1000, lr_scale=self.lr_scale, rollbacks=self.rollbacks)

    def checkpoint(self, kind: str) -> bool:
        if kind != "start" and self.status():  # the guard gets its say before anything is written
            return True
        self.last_save = self.images_seen
        tensors, meta = self.tensors()
        try:
            self.backups.save(kind, self.images_seen, tensors, meta)
        except ckpt.NonFiniteError as exc:
            self.rollback(f"non-finite weights ({exc})")
            return True
        except ckpt.SaveError as exc:
            good = self.backups.latest()
            kept = f"the newest backup is {good.tensors_path}" if good else "no backup was written yet"
            raise StageError(f"phase {self.name}: {exc}; {kept}. Free some disk space and run the same command again: it resumes from there.") from None
        return False

    def event(self, kind: str, **fields: Any) -> None:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "stage": self.name, "event": kind, "kimg": self.images_seen / 1000, "step": self.step_count, **fields}
        self.events.append(entry)
        write_text(self.job.out_dir / "events.jsonl", "".join(json.dumps(e) + "\n" for e in self.events))
        log.log(logging.WARNING if kind in ("rollback", "failed") else logging.INFO, "%s: %s %s", self.name, kind, fields)

    # ------------------------------------------------------------------------------------- finish

    def validate(self) -> dict[str, dict[str, float]]:
        v, data = self.cfg.validation, self.data
        cond = self.embeddings[data.val_caption_index]
        x0 = data.codec.normalize(data.val_latents.float())
        run = lambda: validation_loss(self.unet, self.scheduler, self.cfg.prediction, x0, cond, data.val_subset_names, v.timesteps, v.noise_seeds)  # noqa: E731
        out = {"raw": run()}
        if self.ema is not None:
            with self.ema.applied(self.unet):
                out["ema"] = run()
        return out

    def validate_flat(self) -> dict[str, float]:
        return self.flat(self.validate())

    @staticmethod
    def flat(val: dict[str, dict[str, float]]) -> dict[str, float]:
        """history.tsv columns: val_raw_t100, val_ema_loss, val_raw_subset_woman, ..."""
        return {f"val_{w}_{k}": x for w, d in val.items() for k, x in d.items()}

    @contextlib.contextmanager
    def output_weights(self):
        """The weights this phase publishes: the EMA's when it has one."""
        if self.ema is not None:
            with self.ema.applied(self.unet):
                yield self.unet
        else:
            yield self.unet

    def finish(self) -> dict[str, Any]:
        cfg, out = self.cfg, self.job.out_dir
        val = self.validate()
        if self.history:
            self.history[-1].update(self.flat(val))
        s = cfg.samples
        prompts = [self.embeddings[self.data.captions.index(p)] for p in s.prompts]
        with self.output_weights():
            latents = sample_latents(self.unet, self.scheduler_config, cfg.prediction, cfg.zero_terminal_snr, torch.stack(prompts), self.embeddings[self.empty][None],
                                     s.seeds, s.steps, s.guidance_scale, self.data.latent_shape)
            weights = {k: v.detach().clone() for k, v in self.unet.state_dict().items()}
        write_samples(out / "samples.png", self.codec, latents, s.prompts, len(s.seeds))
        last = self.history[-1] if self.history else {}
        metrics = {"val": val, "split": "heldout" if self.data.heldout else "train", "train": {"loss": last.get("loss")},
                   "images_seen": self.images_seen, "kimg": self.images_seen / 1000, "wall_s": round(self.wall_s, 1), "rollbacks": self.rollbacks,
                   "rows": self.data.counts}
        write_json(out / "metrics.json", metrics)
        write_history(out / "history.tsv", self.history)
        end = self.backups.latest()
        meta = {"phase": self.name, "parent": cfg.parent, "parent_sha256": self.parent_sha256, "codec_id": self.codec.id,
                "codec": {"name": self.job.codec.name, "shift": self.codec.shift, "scale": self.codec.scale}, "resolution_px": cfg.resolution_px,
                "unet_config": {k: v for k, v in dict(self.unet.config).items() if not k.startswith("_")}, "scheduler": self.scheduler_config,
                "prediction": cfg.prediction, "zero_terminal_snr": cfg.zero_terminal_snr, "ema_weights": self.ema is not None,
                "images_seen": self.images_seen, "steps": self.step_count, "config": cfg.model_dump(mode="json"), "fingerprint": self.fingerprint,
                "rng": {"seed": cfg.seed, "step": self.step_count}, "end_backup": str(end.tensors_path) if end else None, "device": str(self.device)}
        save_unet(out, weights, meta)
        self.backups.prune_other_fingerprints()
        self.event("finished", kimg_total=self.images_seen / 1000, wall_s=round(self.wall_s, 1))
        return metrics


def run_phase(job: PhaseJob) -> dict[str, Any]:
    trainer = PhaseTrainer(job)  # every check (params, parent, codec, cache, subsets) before anything is written
    return trainer.run()
