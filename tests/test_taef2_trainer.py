"""The trainer's mechanisms on the default codec (TAEF2) at tiny sizes: 64 px -> 128 px (8 -> 16 latent px).

Each test fails when its mechanism is broken: resume bit-identical after SIGKILL, freeze bit-identical,
NaN rollback, the fade-in (ramp, and the parent's path on the *real* latents of the half-size images),
GAN isolation (the generator's loss never reaches D, D's loss never reaches G). Latents are smooth random
tensors of TAEF2's shape written under the real codec's id (one module-wide cache per resolution), so the
loop runs as on a real cache and previews / metrics decode through the real TAEF2, without encoding time.
The half-size cache holds latents unrelated to the full-size ones, so reading it is distinguishable from
pooling a latent.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import run, taef2_dir
from safetensors.torch import load_file
from tqdm import tqdm

from stagewise.codecs import CodecConfig, load_codec
from stagewise.latents import ShardWriter, to_bytes
from stagewise.models import ModelConfig, grow, init_model
from stagewise.train import checkpoint as ckpt
from stagewise.train import gan as gan_module
from stagewise.train import loop as loop_module
from stagewise.train.guard import POISON_ENV
from stagewise.train.loop import StageJob, StageTrainer, run_stage
from stagewise.train.recipe import parse_train
from test_train_resume import kill_after_a_backup

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_MODEL = dict(resolution_px=64, bottleneck_px=4, channel_base=64, channel_max=16, channel_min=8, ae_dims=32)  # 8 latent px
TINY_DEFAULTS = dict(batch_size=2, lr=0.002, log_every_kimg=0.008, save_every_kimg=0.016, holdout_per_domain=1, preview_rows=1)
PER_DOMAIN = 4


def sha(domain: str, i: int) -> str:
    return hashlib.sha256(f"{domain}{i}".encode()).hexdigest()


def latent_of(domain: str, i: int, flipped: bool, resolution_px: int) -> torch.Tensor:
    """A smooth random raw latent, its own for every (image, flip, resolution)."""
    gen = torch.Generator().manual_seed(int(sha(domain, i)[:8], 16) + 2 * resolution_px + int(flipped))
    px = resolution_px // 8
    return F.interpolate(torch.randn(1, 32, 4, 4, generator=gen), size=(px, px), mode="bilinear")[0].half().float()


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> tuple[CodecConfig, Path]:
    if taef2_dir() is None:
        pytest.skip("TAEF2 weights not found in $STAGEWISE_MODELS/taef2 or ../shared/models/taef2")
    cfg = CodecConfig(name="taef2", weights=str(taef2_dir()))
    codec = load_codec(cfg)
    root = tmp_path_factory.mktemp("taef2_cache")
    for px in (64, 128):
        writer = ShardWriter(root / str(px))
        for domain in "ab":
            for i in range(PER_DOMAIN):
                for flipped in (False, True):
                    latent = latent_of(domain, i, flipped, px)
                    writer.add(sha256=sha(domain, i), domain=domain, resolution=px, codec_id=codec.id, shape=list(latent.shape), latent=to_bytes(latent), flipped=flipped, caption="", fingerprint="test")
        writer.flush()
    return cfg, root


@pytest.fixture()
def project(tmp_path, caches) -> Path:
    cfg, _ = caches
    codec = load_codec(cfg)
    net = init_model(ModelConfig(**TINY_MODEL), codec.channels, codec.factor)
    ckpt.save_model(tmp_path / "runs" / "init", net, {"stage": "init", "codec_id": codec.id, "config": {}})
    return tmp_path


def job(project: Path, caches, name: str, train) -> StageJob:
    cfg, root = caches
    stage = train.stages[name]
    half = root / str(stage.resolution_px // 2)
    return StageJob(name, train, cfg, project / "runs" / stage.parent, root / str(stage.resolution_px), project / "runs" / name, project / "runs" / name / "backups", progress=False, parent_cache_dir=half if half.is_dir() else None)


def recipe(**stages) -> dict:
    return parse_train({"defaults": TINY_DEFAULTS, "stages": stages})


def stepper(trainer: StageTrainer) -> StageTrainer:
    trainer.pbar = tqdm(disable=True)  # run() makes it; these tests call step() alone
    return trainer


S64 = {"parent": "init", "resolution_px": 64, "length_kimg": 0.016}


@pytest.fixture(scope="module")
def trained_s64(tmp_path_factory, caches) -> Path:
    """runs/s64 (the parent of the growth tests), trained once for the module."""
    cfg, _ = caches
    folder = tmp_path_factory.mktemp("s64")
    codec = load_codec(cfg)
    net = init_model(ModelConfig(**TINY_MODEL), codec.channels, codec.factor)
    ckpt.save_model(folder / "runs" / "init", net, {"stage": "init", "codec_id": codec.id, "config": {}})
    run_stage(job(folder, caches, "s64", recipe(s64=S64)))
    return folder / "runs" / "s64"


def with_s64(project: Path, trained_s64: Path) -> None:
    shutil.copytree(trained_s64, project / "runs" / "s64", ignore=shutil.ignore_patterns("backups"))


# ------------------------------------------------------------------------------------------- fade-in


def test_fade_in_reads_real_half_size_latents_and_ramps_with_kimg(project, caches, trained_s64):
    """At fade 0 the grown model is its parent: the new level gets no gradient, and the parent's input block
    reads the half-size cache's latents of the same images (not a pooled latent); the fade then ramps as a
    pure function of images seen. Forcing model.fade = 1.0 (or a wrong ramp) turns this red."""
    train = recipe(s64=S64, s128={"parent": "s64", "resolution_px": 128, "length_kimg": 0.032, "fade_in_kimg": 0.016, "random_warp": False, "warp": {"affine": False}})
    with_s64(project, trained_s64)
    trainer = stepper(StageTrainer(job(project, caches, "s128", train)))
    model, data = trainer.model, trainer.data
    assert data.has_half
    half_inputs = []
    model.encoder.inputs["8"].register_forward_pre_hook(lambda module, args: half_inputs.append(args[0].detach().clone()))
    fades = []
    new = model.new_names()
    for step in range(5):
        trainer.step()
        fades.append(model.fade)
        if step == 0:
            grads = {n: p.grad for n, p in model.named_parameters() if n in new}
            assert grads and all(g is None or not g.any() for g in grads.values())  # the new level is not in the loss yet
            old = [p.grad for n, p in model.named_parameters() if n.startswith("encoder.inputs.8.")]
            assert all(g is not None and g.any() for g in old)  # ... the parent's path is
            # the parent's input block saw the real 64 px latents of this step's images (keys via the data stream)
            expected = []
            for d in "ab":
                keys = data._train_keys[d].iloc[data.indices(d, 0, 2).numpy()]
                expected += [latent_of(d, int(next(i for i in range(PER_DOMAIN) if sha(d, i) == s)), bool(f), 64) for s, f in zip(keys["sha256"], keys["flipped"])]
            codec = trainer.codec
            torch.testing.assert_close(half_inputs[0], codec.normalize(torch.stack(expected)), rtol=0, atol=1e-6)
    # 4 images a step, 16 images of fade-in: the fade of step k is 4k / 16 (the plan before the step)
    assert fades == [0.0, 0.25, 0.5, 0.75, 1.0]
    later = {n: p.grad for n, p in model.named_parameters() if n in new}
    assert all(g is not None and g.any() for g in later.values())  # fully in: the new level trains


def test_fade_in_on_a_latent_codec_needs_the_half_size_cache(project, caches, trained_s64):
    cfg, root = caches
    train = recipe(s64=S64, s128={"parent": "s64", "resolution_px": 128, "length_kimg": 0.016, "fade_in_kimg": 0.008})
    with_s64(project, trained_s64)
    plain = StageJob("s128", train, cfg, project / "runs" / "s64", root / "128", project / "runs" / "s128", project / "runs" / "s128" / "backups", progress=False)
    with pytest.raises(Exception, match=r"train.stages.s128.fade_in_kimg: .*real latents of the half-size images"):
        StageTrainer(plain)


# ------------------------------------------------------------------------------------------- freeze


def test_freeze_old_keeps_the_parent_bit_identical_through_growth(project, caches, trained_s64):
    train = recipe(s64=S64, s128={"parent": "s64", "resolution_px": 128, "length_kimg": 0.024, "freeze": ["old"], "fade_in_kimg": 0.008})
    with_s64(project, trained_s64)
    run_stage(job(project, caches, "s128", train))
    parent, child = (load_file(str(project / "runs" / s / ckpt.MODEL_FILE)) for s in ("s64", "s128"))
    assert set(parent) < set(child)
    assert all(torch.equal(parent[k], child[k]) for k in parent)  # every old tensor, bit for bit
    grown = grow(ckpt.load_model(project / "runs" / "s64")[0]).state_dict()  # the new level as growth made it
    assert any(not torch.equal(child[k], grown[k]) for k in child if k not in parent)  # ... and it trained


# ---------------------------------------------------------------------------------------- NaN guard


def test_a_run_of_nans_rolls_back_and_continues(project, caches, monkeypatch):
    monkeypatch.setenv(POISON_ENV, ",".join(str(s) for s in range(5, 9)))  # steps 5..8: 4 in a row
    train = recipe(a={**S64, "length_kimg": 0.048, "guard": {"max_bad_steps": 3, "lr_factor": 0.5, "eps_factor": 10}})
    run_stage(job(project, caches, "a", train))
    events = [json.loads(line) for line in (project / "runs" / "a" / "events.jsonl").read_text().splitlines()]
    rollbacks = [e for e in events if e["event"] == "rollback"]
    assert len(rollbacks) == 1 and rollbacks[0]["to_kimg"] == 0.016  # the newest backup before the NaNs (step 4)
    assert rollbacks[0]["lr"] == pytest.approx(0.001) and rollbacks[0]["eps"] == pytest.approx(1e-6)
    meta = json.loads((project / "runs" / "a" / "meta.json").read_text())
    assert meta["images_seen"] == 48 and meta["rollbacks"] == 1 and events[-1]["event"] == "finished"
    assert not ckpt.nonfinite(load_file(str(project / "runs" / "a" / ckpt.MODEL_FILE)))


# ------------------------------------------------------------------------------------------------- GAN


def _grads(trainer: StageTrainer, scale: dict[str, float], monkeypatch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """G's and D's gradients of one step from the trainer's current state, with d_loss / g_loss scaled."""
    for name in ("d_loss", "g_loss"):
        real = getattr(gan_module, name)
        monkeypatch.setattr(loop_module, name, lambda *a, _real=real, _k=scale.get(name, 1.0), **kw: _k * _real(*a, **kw))
    st = trainer.state
    saved = ({k: v.clone() for k, v in st.tensors().items()}, json.loads(json.dumps(st.meta())))
    trainer.step()
    g = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in trainer.trainable.params]
    d = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in st.disc.parameters()]
    st.load(*saved)
    return g, d


def test_gan_losses_reach_only_their_own_network(project, caches, monkeypatch):
    """Scaling D's loss must not change G's gradients, and scaling G's adversarial loss must not change
    D's: removing ``.detach()`` (D's loss reaches G) or ``frozen(disc)`` (G's loss reaches D) turns this red."""
    train = recipe(a={**S64, "gan_power": 0.5, "gan": {"layers": 2}})
    trainer = stepper(StageTrainer(job(project, caches, "a", train)))
    g1, d1 = _grads(trainer, {}, monkeypatch)
    g_dx3, d_dx3 = _grads(trainer, {"d_loss": 3.0}, monkeypatch)
    g_gx3, d_gx3 = _grads(trainer, {"g_loss": 3.0}, monkeypatch)
    same = lambda xs, ys: all(torch.allclose(x, y, rtol=1e-5, atol=1e-9) for x, y in zip(xs, ys))  # noqa: E731
    assert same(g1, g_dx3), "the discriminator's loss reached the generator (pred not detached?)"
    assert same(d1, d_gx3), "the generator's adversarial loss reached the discriminator (D not frozen?)"
    # ... and the test can see a change: each loss does reach its own network
    assert not same(d1, d_dx3) and not same(g1, g_gx3)


# ------------------------------------------------------------------------------------ resume after a kill


def test_killed_taef2_stage_resumes_bit_identical(project, caches):
    cfg, root = caches
    stage = {**S64, "length_kimg": 0.16, "save_every_kimg": 0.04, "lr_dropout": 0.5, "ema": {"halflife_kimg": 0.02}}  # 40 steps, a backup every 10
    params = {"codec": {"name": "taef2", "weights": cfg.weights}, "train": {"defaults": TINY_DEFAULTS, "stages": {"a": stage}}}
    (project / "params.yaml").write_text(yaml.safe_dump(params))

    def cmd(out: str) -> list[str]:
        return [sys.executable, "-m", "stages.train", "--stage", "a", "--parent", "runs/init", "--cache", str(root / "64"), "--out", out, "--no-progress"]

    one_thread = {"OMP_NUM_THREADS": "1"}  # the same thread count in every run: float sums in the same order
    run(cmd("reference/a"), project, env=one_thread)
    newest_at_kill = kill_after_a_backup(cmd("runs/a"), project, project / "runs" / "a" / "backups", one_thread)
    assert newest_at_kill < 160 and not (project / "runs" / "a" / "model.safetensors").exists()  # killed mid-stage
    run(cmd("runs/a"), project, env=one_thread)
    events = [json.loads(line) for line in (project / "runs" / "a" / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events].count("resumed") == 1
    ours, theirs = load_file(str(project / "runs/a/model.safetensors")), load_file(str(project / "reference/a/model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
