"""One diffusion phase: the parent's UNet in, ``runs/<phase>/`` out. To resume, run the same command again.

The loop is the autoencoder trainer's, the one ``runner.Runner.run`` (status -> validation -> checkpoint ->
done -> step, progress in images, torchrun DDP when ``diffusion.devices`` > 1) on the same shared pieces: ``Backups`` (atomic safetensors + JSON, rolling + start/end),
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
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
from stagewise.io import sha256_file, write_json
from stagewise.train import checkpoint as ckpt
from stagewise.train.data import mix_seed
from stagewise.train.ema import EMA
from stagewise.train.dist import batch_split_error
from stagewise.train.guard import NanGuard, skip_if_not_finite
from stagewise.train.loop import write_history  # the autoencoder loop's history.tsv writer
from stagewise.train.recipe import INIT
from stagewise.train.runner import Cadence, Runner, cadence

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


class PhaseTrainer(Runner):
    kind, section, kimg_digits = "phase", "diffusion.stages", 4

    def __init__(self, job: PhaseJob):
        from diffusers import DDPMScheduler

        self.job, self.cfg, self.name = job, job.cfg, job.name
        cfg = self.cfg
        self.device = self.init_runner(pick_device(job.diffusion.device))
        if error := batch_split_error(cfg.batch_size, self.dist.world, "diffusion.devices"):
            raise phase_error(self.name, "batch_size", error)
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
        self.guard = NanGuard(self.device, cfg.guard.max_bad_steps)
        self.gen = torch.Generator(device=self.device)
        self.images_seen = self.step_count = self.rollbacks = 0
        self.lr_scale = self.eps_scale = 1.0
        self.wall_s = 0.0
        self.history: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.epoch = 0
        self.counters = self  # the runner's images_seen, scales, rollbacks, wall_s, history, events
        self.parent_sha256 = sha256_file(job.parent_dir / dm.UNET_FILE)
        self.fingerprint = fingerprint(cfg.resume_fingerprint_fields(), self.codec.id, self.codec.shift, self.codec.scale, self.parent_sha256, self.data.fingerprint, code_fingerprint(DIFFUSE_CODE))
        self.backups = ckpt.Backups(job.backups_dir, self.fingerprint, cfg.backups_kept)
        self.resume_or_start(self._start)

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

    def _start(self) -> dict[str, Any]:
        self.apply_hparams()
        return dict(parent=self.cfg.parent, rows=len(self.data.latents), subsets=self.data.counts, optimizer=self.cfg.optimizer)

    # ------------------------------------------------------------------------- the runner's interface

    @property
    def step_index(self) -> int:
        return self.step_count

    def cadence(self) -> Cadence:
        cfg = self.cfg
        return cadence(self.images_seen, cfg.log_every_kimg, cfg.save_every_kimg, cfg.validation.every_kimg)

    def backup_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return self.tensors()

    def load_backup(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], counters_too: bool = True) -> None:
        self.load(tensors, meta, counters_too=counters_too)

    def snapshot(self) -> None:
        """The validation grid during the phase, into the newest history row."""
        if self.history:
            self.history[-1].update(self.validate_flat())

    def status_fields(self, row: dict[str, Any]) -> dict[str, Any]:
        return {"epoch": self.epoch, "lr": self.cfg.lr * self.lr_scale * lr_factor(self.images_seen, self.cfg)}

    def postfix(self, row: dict[str, Any]) -> dict[str, str]:
        return {"loss": f"{row['loss']:.4f}"}

    def after_rollback(self) -> dict[str, Any]:
        self.apply_hparams()
        return {}

    # ------------------------------------------------------------------------------------------- loop

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
        (dropped ones point at ""); every draw seeded from (seed, step, micro). Under DDP each rank draws
        the global batch's noise, timesteps and dropout and keeps its rows' (``part``): one process's draws."""
        cfg, data = self.cfg, self.data
        self.gen.manual_seed(mix_seed(cfg.seed, self.step_count, micro, 1))
        n, part = len(rows), self.dist.rows(len(rows))
        x0 = data.batch(rows[part])
        if poison:
            x0 = x0 * float("nan")
        noise = torch.randn((n, *x0.shape[1:]), generator=self.gen, device=self.device)
        if cfg.offset_noise:  # zero-frequency noise: lets the model change an image's mean brightness
            noise = noise + cfg.offset_noise * torch.randn((n, x0.shape[1], 1, 1), generator=self.gen, device=self.device)
        t = torch.randint(0, self.num_timesteps, (n,), generator=self.gen, device=self.device)
        keep = torch.rand(n, generator=self.gen, device=self.device) >= data.dropout[rows]
        caption = torch.where(keep, data.caption_index[rows], self.empty)
        return {"x0": x0, "noise": noise[part], "t": t[part], "caption": caption[part], "weight": data.loss_weight[rows][part]}

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
        total = self.sync_gradients(list(self.unet.parameters()), total)
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
        self.accumulate({"loss": total, "grad_norm": norm.float()}, finite)
        self.epoch = epoch
        self.step_count += 1
        self.images_seen += batch * accum
        self.pbar.update(batch * accum)

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
