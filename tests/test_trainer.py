"""The progressive trainer, through its real loop on tiny pixel-codec caches (16 and 32 px).

Each mechanism has a test that fails without it: freeze (incl. ``old``), random warp on the input only,
LRD, GAN wiring, fp16 / bf16, EMA outputs, the NaN guard (skip, rollback, bounded failure), short
cycles (bit-identical to an uninterrupted run), and the recipe's checks.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import run
from safetensors.torch import load_file

from stagewise.codecs import CodecConfig
from stagewise.config import ParamsError
from stagewise.latents import ShardWriter, to_bytes
from stagewise.models import ModelConfig, grow, init_model
from stagewise.train import checkpoint as ckpt
from stagewise.train import loop as loop_module
from stagewise.train.augment import augment
from stagewise.train.data import mix_seed
from stagewise.train.guard import POISON_ENV
from stagewise.train.loop import StageJob, StageTrainer, run_stage
from stagewise.train.recipe import parse_train

TINY_MODEL = dict(resolution_px=16, bottleneck_px=4, channel_base=64, channel_max=16, channel_min=8, ae_dims=32)
# 4 images per domain per step (8 images), 10 steps per 0.08 kimg; a status every 2 steps.
TINY_DEFAULTS = dict(batch_size=4, lr=0.002, log_every_kimg=0.016, save_every_kimg=0.04, holdout_per_domain=1, preview_rows=1)


def write_cache(root: Path, resolution_px: int, per_domain: int = 5) -> None:
    """Smooth random RGB images (pixels codec = identity), both domains, each with its mirrored row."""
    writer = ShardWriter(root / str(resolution_px))
    gen = torch.Generator().manual_seed(0)
    for domain in "ab":
        for i in range(per_domain):
            coarse = torch.rand(1, 3, 4, 4, generator=gen)
            image = F.interpolate(coarse, size=(resolution_px, resolution_px), mode="bilinear", align_corners=False)[0]
            image = image.flip(0) if domain == "b" else image  # a different colour distribution per domain
            sha = hashlib.sha256(f"{domain}{i}".encode()).hexdigest()
            for flipped in (False, True):
                x = image.flip(-1) if flipped else image
                writer.add(sha256=sha, domain=domain, resolution=resolution_px, codec_id="pixels", shape=list(x.shape), latent=to_bytes(x), flipped=flipped, caption="", fingerprint="test")
    writer.flush()


def write_init(folder: Path, **model) -> None:
    net = init_model(ModelConfig(**{**TINY_MODEL, **model}), 3, 1)
    ckpt.save_model(folder, net, {"stage": "init", "codec_id": "pixels", "config": {}})


@pytest.fixture()
def project(tmp_path) -> Path:
    for res in (16, 32):
        write_cache(tmp_path / "cache", res)
    write_init(tmp_path / "runs" / "init")
    return tmp_path


def train_cfg(stages: dict, **defaults):
    return parse_train({"defaults": {**TINY_DEFAULTS, **defaults}, "stages": stages})


def job(project: Path, name: str, train, **kw) -> StageJob:
    stage = train.stages[name]
    return StageJob(name, train, CodecConfig(name="pixels"), project / "runs" / stage.parent, project / "cache" / str(stage.resolution_px), project / "runs" / name, project / "runs" / name / "backups", progress=False, **kw)


def stage(parent="init", px=16, kimg=0.08, **kw) -> dict:
    return {"parent": parent, "resolution_px": px, "length_kimg": kimg, **kw}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def end_backup(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    backup = next(b for b in ckpt.Backups(folder / "backups", json.loads((folder / "meta.json").read_text())["fingerprint"], 1).list() if b.kind == "end")
    return backup.load("cpu")


# ------------------------------------------------------------------------------------------- recipe


@pytest.mark.parametrize(
    "stages, defaults, message",
    [
        ({"a": stage(parent="b"), "b": stage()}, {}, "train.stages.a.parent: 'b' is not an earlier stage or 'init' (it comes later"),
        ({"a": stage(), "b": stage(parent="a", px=64)}, {}, "train.stages.b.resolution_px: 64 is neither the parent's (a: 16 px) nor twice it"),
        ({"a": stage(px=24)}, {}, "train.stages.a.resolution_px: 24 is not a power of two"),
        ({"a": stage(lrr=1)}, {}, "train.stages.a.lrr: unknown key"),
        ({"a": stage()}, {"parent": "init"}, "train.defaults.parent: set it in each stage"),
        ({"a": stage()}, {"lrr": 1}, "train.defaults.lrr: unknown key"),
        ({"init": stage()}, {}, "train.stages.init: a stage name"),
    ],
)
def test_recipe_errors_name_the_key(stages, defaults, message):
    with pytest.raises(ParamsError) as err:
        parse_train({"defaults": defaults, "stages": stages})
    assert message in str(err.value)


def test_defaults_merge_under_each_stage():
    cfg = parse_train({"defaults": {"batch_size": 3, "loss": {"ssim": 1.0}}, "stages": {"a": stage(loss={"mse": 0.5}), "b": stage(parent="a", batch_size=5)}})
    assert (cfg.stages["a"].batch_size, cfg.stages["b"].batch_size) == (3, 5)
    assert (cfg.stages["a"].loss.mse, cfg.stages["a"].loss.ssim, cfg.stages["b"].loss.mse) == (0.5, 1.0, 1.0)


def test_freeze_patterns_must_match(project):
    train = train_cfg({"a": stage(freeze=["decoder_c"]), "b": stage(freeze=["old"]), "c": stage(freeze=["encoder", "inter", "decoder_*"])})
    with pytest.raises(ParamsError, match=r"train\.stages\.a\.freeze: pattern 'decoder_c' matches no parameter"):
        StageTrainer(job(project, "a", train))
    with pytest.raises(ParamsError, match=r"train\.stages\.b\.freeze: pattern 'old' matches no parameter; the model has not grown yet"):
        StageTrainer(job(project, "b", train))
    with pytest.raises(ParamsError, match="nothing would train"):
        StageTrainer(job(project, "c", train))


# ------------------------------------------------------------------------------------------- freeze


@pytest.mark.parametrize("freeze", [["old"], []])
def test_freeze_old_keeps_parent_tensors_bit_identical(project, freeze):
    train = train_cfg({"grow": stage(px=32, freeze=freeze, fade_in_kimg=0.04, ema={"halflife_kimg": 0.02})})
    run_stage(job(project, "grow", train))
    parent, child = weights(project / "runs" / "init"), weights(project / "runs" / "grow")
    tensors, _ = end_backup(project / "runs" / "grow")
    optimizer_params = {k.split(".", 1)[1].rsplit(".", 1)[0] for k in tensors if k.startswith("opt.")}
    unchanged = {n for n in parent if torch.equal(parent[n], child[n])}
    new = set(child) - set(parent)
    if freeze:
        assert unchanged == set(parent)  # every old tensor bit-identical (EMA weights published, too)
        assert optimizer_params == new  # the optimizer holds state for the new level only
    else:  # the control: without the freeze, the old tensors do train
        assert len(unchanged) < len(parent) / 2
        assert optimizer_params >= set(parent) - {n for n in parent if ".inputs.16." in n or ".outputs.16." in n}
    grown = grow(ckpt.load_model(project / "runs" / "init")[0]).state_dict()  # the new level as initialised
    assert all(not torch.equal(child[n], grown[n]) for n in new if ".outputs.16." not in n)  # ... and trained


def test_freeze_by_name_pattern(project):
    train = train_cfg({"a": stage(freeze=["decoder_a", "inter*"])})
    run_stage(job(project, "a", train))
    parent, child = weights(project / "runs" / "init"), weights(project / "runs" / "a")
    frozen = {n for n in parent if n.startswith(("decoder_a.", "inter."))}
    assert {n for n in parent if torch.equal(parent[n], child[n])} == frozen
    meta = json.loads((project / "runs" / "a" / "meta.json").read_text())
    assert set(meta["frozen"]) == frozen


# ------------------------------------------------------------------------------------ warp, LRD, GAN


@pytest.mark.parametrize("warp,affine", [(True, True), (False, True), (True, False)])
def test_one_affine_for_input_and_target_and_the_warp_on_the_input_only(project, monkeypatch, warp, affine):
    """DFL's semantics: the target is the sample under the shared affine (the identity with warp.affine
    off), the input is the same affine plus the smooth field (the affine alone with random_warp off)."""
    seen = {}
    real_loss = loop_module.reconstruction_loss

    def spy(pred, target, weights):
        seen.setdefault("targets", []).append(target.detach().clone())
        return real_loss(pred, target, weights)

    monkeypatch.setattr(loop_module, "reconstruction_loss", spy)
    trainer = StageTrainer(job(project, "a", train_cfg({"a": stage(random_warp=warp, flip=False, warp={"affine": affine})})))
    inputs = []
    trainer.model.encoder.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach().clone()))
    trainer.step()
    batch = torch.cat([trainer.data.batch(d, 0, 4) for d in "ab"])  # step 0's rows of each domain
    target, source = torch.cat(seen["targets"]), inputs[0]
    assert torch.equal(target, batch) != affine  # the target moves exactly when the affine is on
    assert torch.equal(source, target) != warp  # the input differs from the target exactly by the warp
    # ... and both are the augmentation the step's seed draws, of the batch the data stream gives
    expected = augment(batch, torch.Generator().manual_seed(mix_seed(0, 0, 1)), trainer.cfg.warp, warp)
    torch.testing.assert_close(target, expected.target, rtol=0, atol=0)
    torch.testing.assert_close(source, expected.source, rtol=0, atol=0)
    if affine and warp:  # the input's field is on top of the target's affine: the input is close to the target, not the batch
        assert (source - target).abs().mean() < (source - batch).abs().mean()


def one_step(project, **settings) -> tuple[StageTrainer, dict[str, torch.Tensor]]:
    trainer = StageTrainer(job(project, "a", train_cfg({"a": stage(**settings)})))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.step()
    return trainer, before


def test_lr_dropout_masks_the_update_but_not_the_moments(project):
    for keep, low, high in ((0.3, 0.2, 0.4), (1.0, 0.97, 1.0)):
        trainer, before = one_step(project, lr_dropout=keep)
        moved = total = 0
        for name, param in trainer.model.named_parameters():
            moved += (param.detach() != before[name]).sum().item()
            total += param.numel()
            state = trainer.state.opt.state[param]
            assert (state["exp_avg_sq"] > 0).float().mean() > 0.97  # every element's moment saw its gradient
        assert low <= moved / total <= high, (keep, moved / total)


def test_gan_has_its_own_optimizer_and_reaches_the_generator(project):
    plain, _ = one_step(project, gan_power=0.0)
    assert plain.state.disc is None and plain.state.d_opt is None
    assert not any(k.startswith(("disc.", "d_opt.")) for k in plain.state.tensors())
    gan, _ = one_step(project, gan_power=0.5)
    disc_params = set(map(id, gan.state.disc.parameters()))
    g_params = {id(p) for group in gan.state.opt.param_groups for p in group["params"]}
    d_params = {id(p) for group in gan.state.d_opt.param_groups for p in group["params"]}
    assert d_params == disc_params and not (g_params & disc_params)
    assert all(gan.state.d_opt.state[p]["step"] == 1 for p in gan.state.disc.parameters())  # D stepped
    assert any(k.startswith("d_opt.") for k in gan.state.tensors())  # ... and is part of every backup
    # Same seed, same batch: the adversarial term is the only difference, and it reaches G's weights.
    assert any(not torch.equal(p, q) for p, q in zip(plain.model.parameters(), gan.model.parameters()))


# --------------------------------------------------------------------------------- precision, EMA


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_trains(project, precision):
    train = train_cfg({"a": stage(kimg=0.24, precision=precision, eps=1e-5, random_warp=False)})
    metrics = run_stage(job(project, "a", train))
    history = [line.split("\t") for line in (project / "runs" / "a" / "history.tsv").read_text().splitlines()]
    column = history[0].index("loss_a")
    assert float(history[-1][column]) < 0.7 * float(history[1][column])  # it learns
    tensors, meta = end_backup(project / "runs" / "a")
    assert not ckpt.nonfinite(tensors)
    if precision == "fp16":
        assert meta["scaler"]["scale"] > 0  # the grad scaler ran and is saved for resume
    else:
        assert meta["scaler"] == {}
    assert metrics["rollbacks"] == 0


@pytest.mark.parametrize("use_for_output", [True, False])
def test_ema_weights_are_published_when_configured(project, use_for_output):
    train = train_cfg({"a": stage(ema={"halflife_kimg": 0.02, "use_for_output": use_for_output})})
    run_stage(job(project, "a", train))
    published = weights(project / "runs" / "a")
    tensors, _ = end_backup(project / "runs" / "a")
    ema = {n: tensors[f"ema.{n}"] for n in published}
    raw = {n: tensors[f"model.{n}"] for n in published}
    expected, other = (ema, raw) if use_for_output else (raw, ema)
    assert all(torch.equal(published[n], expected[n]) for n in published)
    assert not all(torch.equal(published[n], other[n]) for n in published)


# ---------------------------------------------------------------------------------------- NaN guard


def test_a_non_finite_step_touches_nothing(project, monkeypatch):
    monkeypatch.setenv(POISON_ENV, "2")
    trainer = StageTrainer(job(project, "a", train_cfg({"a": stage()})))
    trainer.step(), trainer.step()
    before = {k: v.clone() for k, v in trainer.state.tensors().items()}
    trainer.step()  # poisoned: NaN loss and gradients
    after = trainer.state.tensors()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights, moments and step counts
    assert trainer.guard.check() == (1, 1)
    trainer.step()
    assert not torch.equal(before["model.encoder.inputs.16.conv.weight"], trainer.state.tensors()["model.encoder.inputs.16.conv.weight"])


def test_a_run_of_nans_rolls_back_and_continues(project, monkeypatch):
    monkeypatch.setenv(POISON_ENV, ",".join(str(s) for s in range(6, 12)))  # steps 6..11: 6 in a row
    train = train_cfg({"a": stage(kimg=0.12, guard={"max_bad_steps": 4, "lr_factor": 0.5, "eps_factor": 10})})
    metrics = run_stage(job(project, "a", train))
    events = [json.loads(line) for line in (project / "runs" / "a" / "events.jsonl").read_text().splitlines()]
    rollbacks = [e for e in events if e["event"] == "rollback"]
    assert len(rollbacks) == 1 and rollbacks[0]["to_kimg"] == 0.04  # the newest backup before the NaNs
    assert rollbacks[0]["lr"] == pytest.approx(0.001) and rollbacks[0]["eps"] == pytest.approx(1e-6)
    meta = json.loads((project / "runs" / "a" / "meta.json").read_text())
    assert meta["images_seen"] == 120 and meta["rollbacks"] == metrics["rollbacks"] == 1
    assert events[-1]["event"] == "finished"


def test_rollbacks_are_bounded_and_name_the_good_backup(project):
    """A learning rate that blows the weights up every time: the stage gives up with a clear message (a real process)."""
    params = {"codec": {"name": "pixels"}, "train": {"defaults": TINY_DEFAULTS, "stages": {"a": stage(lr=1e30, guard={"max_bad_steps": 2, "max_rollbacks": 2})}}}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [sys.executable, "-m", "stages.train", "--stage", "a", "--parent", "runs/init", "--cache", "cache/16", "--out", "runs/a", "--no-progress"]
    proc = run(cmd, project, check=False)
    assert proc.returncode == 2, proc.stderr
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("error: stage a: ") and "after 2 rollback(s)" in message and "giving up" in message
    assert "the last good backup is runs/a/backups/" in message and "start-000000000000.safetensors" in message
    events = [json.loads(line) for line in (project / "runs" / "a" / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events].count("rollback") == 2 and events[-1]["event"] == "failed"
    for path in (project / "runs" / "a" / "backups").rglob("*.safetensors"):
        assert not ckpt.nonfinite(load_file(str(path))), path  # non-finite weights are never saved
    assert not (project / "runs" / "a" / "model.safetensors").exists()


def test_non_finite_tensors_are_refused(tmp_path):
    with pytest.raises(ckpt.NonFiniteError, match="w"):
        ckpt.save_tensors(tmp_path / "x.safetensors", {"w": torch.tensor([1.0, float("inf")])})
    assert not (tmp_path / "x.safetensors").exists()


# ------------------------------------------------------------------------------------------ cycles


def test_short_cycles_match_an_uninterrupted_run(project):
    """Save-and-reload every 0.04 kimg is bit-identical to never reloading: the backup holds the whole state
    (model, Adam moments, EMA, D and its optimizer, scaler), and the random streams are pure functions of the step."""
    settings = dict(kimg=0.12, lr_dropout=0.5, gan_power=0.1, ema={"halflife_kimg": 0.02}, precision="fp16", eps=1e-5)
    train = train_cfg({"plain": stage(**settings), "cycled": stage(short_cycle_kimg=0.04, **settings)})
    run_stage(job(project, "plain", train))
    run_stage(job(project, "cycled", train))
    events = [json.loads(line)["event"] for line in (project / "runs" / "cycled" / "events.jsonl").read_text().splitlines()]
    assert events.count("short_cycle") == 2
    plain, cycled = end_backup(project / "runs" / "plain")[0], end_backup(project / "runs" / "cycled")[0]
    assert plain.keys() == cycled.keys()
    assert [k for k in plain if not torch.equal(plain[k], cycled[k])] == []


def test_backups_roll_and_stage_boundaries_are_kept(project):
    train = train_cfg({"a": stage(save_every_kimg=0.016, backups_kept=2)})  # a rolling backup every 2 steps
    run_stage(job(project, "a", train))
    meta = json.loads((project / "runs" / "a" / "meta.json").read_text())
    kept = [(b.kind, b.images_seen) for b in ckpt.Backups(project / "runs/a/backups", meta["fingerprint"], 2).list()]
    assert kept == [("start", 0), ("rolling", 48), ("rolling", 64), ("end", 80)]
    assert meta["end_backup"].endswith("end-000000000080.safetensors")
    # The stage's config is the resume key: a different one starts fresh, and its finish prunes the stale state.
    run_stage(job(project, "a", train_cfg({"a": stage(save_every_kimg=0.016, backups_kept=2, lr=0.001)})))
    assert [p.name for p in (project / "runs/a/backups").iterdir()] == [json.loads((project / "runs/a/meta.json").read_text())["fingerprint"]]


def test_grad_accumulation_averages_micro_batches(project):
    """Two micro-batches of 4 images = one batch of 8 (same rows): Adam's first moment after one step matches."""
    common = dict(random_warp=False, flip=False, warp={"affine": False})  # one batch draws one affine per image, two micro-batches others
    whole, _ = one_step(project, batch_size=4, **common)
    accumulated, _ = one_step(project, batch_size=2, grad_accum=2, **common)
    assert accumulated.state.images_seen == whole.state.images_seen == 8
    for p, q in zip(whole.model.parameters(), accumulated.model.parameters()):
        torch.testing.assert_close(accumulated.state.opt.state[q]["exp_avg"], whole.state.opt.state[p]["exp_avg"], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("resolution_px", [16, 256])
def test_preview_grid_layout_and_titles(resolution_px):
    """Rows A then B; columns source, same-domain reconstruction, swap; source cells are the decoded
    latents themselves; the title strip grows with the image so it stays readable at 512 px."""
    import numpy as np

    from stagewise.codecs import load_codec
    from stagewise.train.preview import preview_grid, to_pixels

    codec = load_codec(CodecConfig(name="pixels"))
    net = init_model(ModelConfig(**TINY_MODEL), 3, 1)
    while net.resolution_px < resolution_px:
        net = grow(net)
    gen = torch.Generator().manual_seed(1)
    sources = {d: codec.normalize(torch.rand(2, 3, resolution_px, resolution_px, generator=gen)) for d in "ab"}
    canvas = preview_grid(net, codec, sources)

    header_px = canvas.height - 4 * resolution_px
    assert canvas.width == 3 * resolution_px and header_px >= max(18, resolution_px // 10)
    pixels = torch.from_numpy(np.array(canvas)).permute(2, 0, 1).float() / 255
    for row, source in enumerate([*sources["a"], *sources["b"]]):
        cell = pixels[:, header_px + row * resolution_px:header_px + (row + 1) * resolution_px, :resolution_px]
        torch.testing.assert_close(cell, to_pixels(codec, source[None])[0], atol=1 / 255, rtol=0)
    strip = np.array(canvas.crop((0, 0, canvas.width, header_px)).convert("L"))
    assert (strip < 128).mean() > 0.01  # the titles are drawn
