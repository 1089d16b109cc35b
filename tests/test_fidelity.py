"""DFL semantics on the default codec (TAEF2, tiny sizes): state carried across stages, and cached flips.

Latents are smooth random tensors of TAEF2's shape written under the real codec's id, so the trainer runs
exactly as on a real cache (previews and metrics decode through the real TAEF2) without encoding time.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import taef2_dir
from safetensors.torch import load_file
from tqdm import tqdm

from stagewise.config import ParamsError
from stagewise.codecs import CodecConfig, load_codec
from stagewise.latents import ShardWriter, to_bytes
from stagewise.models import ModelConfig, init_model
from stagewise.train import checkpoint as ckpt
from stagewise.train.loop import StageJob, StageTrainer, run_stage
from stagewise.train.recipe import parse_train

TINY_MODEL = dict(resolution_px=128, bottleneck_px=4, channel_base=64, channel_max=16, channel_min=8, ae_dims=32)  # 16 latent px
TINY_DEFAULTS = dict(batch_size=2, lr=0.002, log_every_kimg=0.008, save_every_kimg=0.016, holdout_per_domain=1, preview_rows=1)


@pytest.fixture(scope="module")
def codec_cfg() -> CodecConfig:
    if taef2_dir() is None:
        pytest.skip("TAEF2 weights not found in $STAGEWISE_MODELS/taef2 or ../shared/models/taef2")
    return CodecConfig(name="taef2", weights=str(taef2_dir()))


def write_cache(root: Path, codec_id: str, flipped_rows: bool, per_domain: int = 4, resolution_px: int = 128) -> None:
    writer = ShardWriter(root)
    gen = torch.Generator().manual_seed(0)
    px = resolution_px // 8
    for domain in "ab":
        for i in range(per_domain):
            latent = F.interpolate(torch.randn(1, 32, 4, 4, generator=gen), size=(px, px), mode="bilinear")[0]
            sha = hashlib.sha256(f"{domain}{i}".encode()).hexdigest()
            for flipped in (False, True) if flipped_rows else (False,):
                writer.add(sha256=sha, domain=domain, resolution=resolution_px, codec_id=codec_id, shape=list(latent.shape), latent=to_bytes(latent), flipped=flipped, caption="", fingerprint="test")
    writer.flush()


@pytest.fixture()
def project(tmp_path, codec_cfg) -> Path:
    codec = load_codec(codec_cfg)
    write_cache(tmp_path / "cache" / "128", codec.id, flipped_rows=True)
    write_cache(tmp_path / "cache_noflip" / "128", codec.id, flipped_rows=False)
    net = init_model(ModelConfig(**TINY_MODEL), codec.channels, codec.factor)
    ckpt.save_model(tmp_path / "runs" / "init", net, {"stage": "init", "codec_id": codec.id, "config": {}})
    return tmp_path


def job(project: Path, name: str, train, codec_cfg, cache: str = "cache") -> StageJob:
    stage = train.stages[name]
    return StageJob(name, train, codec_cfg, project / "runs" / stage.parent, project / cache / "128", project / "runs" / name, project / "runs" / name / "backups", progress=False)


def adam_update(g, m0, v0, t0, lr, betas, eps):
    b1, b2 = betas
    m, v, t = b1 * m0 + (1 - b1) * g, b2 * v0 + (1 - b2) * g * g, t0 + 1
    return -lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)


@pytest.mark.parametrize("reset", [False, True])
def test_first_step_after_rw_off_uses_the_carried_adam_moments(project, codec_cfg, reset):
    """DFL keeps its optimizer when random warp goes off: the child's first update is Adam's with the
    parent's moments and step count, not a fresh Adam's lr * sign(g) (which reset_optimizer asks for)."""
    stages = {"s128": {"parent": "init", "resolution_px": 128, "length_kimg": 0.016}, "rw_off": {"parent": "s128", "resolution_px": 128, "length_kimg": 0.016, "random_warp": False, "reset_optimizer": reset}}
    train = parse_train({"defaults": TINY_DEFAULTS, "stages": stages})
    run_stage(job(project, "s128", train, codec_cfg))
    carried = load_file(str(project / "runs" / "s128" / ckpt.CARRY_FILE))
    trainer = StageTrainer(job(project, "rw_off", train, codec_cfg))
    trainer.pbar = tqdm(disable=True)  # run() makes it; this test calls step() alone
    cfg = trainer.cfg
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.step()
    compared = 0
    for name, p in trainer.model.named_parameters():
        g = p.grad
        if g is None or g.abs().max() == 0:
            continue
        if reset:
            expected = adam_update(g, torch.zeros_like(g), torch.zeros_like(g), 0, cfg.lr, cfg.betas, cfg.eps)
        else:
            m0, v0, t0 = carried[f"opt.{name}.exp_avg"], carried[f"opt.{name}.exp_avg_sq"], float(carried[f"opt.{name}.step"])
            assert t0 == 4  # s128's steps: 16 images, 2 per domain per step
            expected = adam_update(g, m0, v0, t0, cfg.lr, cfg.betas, cfg.eps)
        torch.testing.assert_close(p.detach() - before[name], expected, rtol=1e-2, atol=1e-3 * cfg.lr)  # float32 weights: w1 - w0 is exact to ~1e-8
        compared += 1
    assert compared > 10
    # a fresh Adam's first step is lr * sign(g) to within eps: the carried one is not
    deltas = torch.cat([(p.detach() - before[n]).flatten() for n, p in trainer.model.named_parameters() if p.grad is not None])
    sign_steps = (deltas.abs() - cfg.lr).abs() < 0.01 * cfg.lr
    assert sign_steps.float().mean() > 0.9 if reset else sign_steps.float().mean() < 0.5


def test_flip_without_mirrored_rows_is_an_error_on_taef2(project, codec_cfg):
    """Mirroring a TAEF2 latent is not the latent of the mirrored image: a cache without mirrored rows
    and flip on is refused, naming cache.flip; flip: false trains and never mirrors."""
    train = parse_train({"defaults": TINY_DEFAULTS, "stages": {"a": {"parent": "init", "resolution_px": 128, "length_kimg": 0.008}}})
    with pytest.raises(ParamsError, match=r"train.stages.a.flip: .*no mirrored rows.*cache.flip: true"):
        StageTrainer(job(project, "a", train, codec_cfg, cache="cache_noflip"))
    train = parse_train({"defaults": {**TINY_DEFAULTS, "flip": False}, "stages": {"a": {"parent": "init", "resolution_px": 128, "length_kimg": 0.008}}})
    trainer = StageTrainer(job(project, "a", train, codec_cfg, cache="cache_noflip"))
    assert not trainer.flip_on_the_fly
