"""Diffusion phases: each mechanism of diffusion.stages on a tiny UNet and text encoder, on a cache encoded
by the default codec (taef2), in-process; plus the diffusers codec on tiny random VAEs and the bad-input
errors, and the kill-and-resume test with a real process."""

from __future__ import annotations

import argparse
import itertools
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, taef2_dir
from stagewise.cli import StageError
from stagewise.codecs import CodecConfig, load_codec
from stagewise.config import ParamsError
from stagewise.diffusion.config import load_diffusion, parse_diffusion
from stagewise.diffusion.loop import PhaseJob, PhaseTrainer, load_unet
from stagewise.diffusion.optim import load_optimizer_state, lr_factor, make_optimizer, optimizer_state
from tiny_diffusion import TINY_PHASE as TINY_PHASE_DEFAULTS, TINY_TEXT, TINY_UNET, params, tiny_sd_folder, tiny_vae, write_cache, write_params

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.skipif(taef2_dir() is None, reason="TAEF2 weights not on this machine (set STAGEWISE_MODELS)")]
P1 = {"parent": "init", "resolution_px": 32, "length_kimg": 0.016}
COUNTER = itertools.count()


def init_stage(folder, params_file):
    from stages.diffuse_init import main

    main(argparse.Namespace(params=str(params_file), out=str(folder / "runs" / "init")))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A taef2 cache at 32 px (4 x 4 latents) and a built init, shared by the tests of this module."""
    import os

    os.environ.setdefault("STAGEWISE_MODELS", str(taef2_dir().parent))
    folder = tmp_path_factory.mktemp("diffusion")
    codec = load_codec(CodecConfig())
    write_cache(folder / "cache", codec, 32)
    init_stage(folder, write_params(folder, {"p1": P1}))
    return folder


def trainer(work, name="p1", **phase) -> PhaseTrainer:
    cfg = parse_diffusion(params({name: {**P1, **phase}})["diffusion"])
    out = work / "runs" / f"{name}-{next(COUNTER)}"  # a folder of its own: no test resumes another's backups
    job = PhaseJob(name=name, diffusion=cfg, codec=CodecConfig(), parent_dir=work / "runs" / "init", text_dir=work / "runs" / "init" / "text",
                   cache_dir=work / "cache" / "32", out_dir=out, backups_dir=out / "backups", progress=False)
    return PhaseTrainer(job)


# ------------------------------------------------------------------------------------------ the phase


def test_a_phase_writes_samples_validation_per_timestep_and_backups(work):
    t = trainer(work, ema_halflife_kimg=0.01, subsets={"women": {"caption_regex": "woman|girl"}, "men": {"domain": "b"}})
    metrics = t.run()
    out = t.job.out_dir
    assert {"unet.safetensors", "unet.json", "samples.png", "metrics.json", "history.tsv", "events.jsonl"} <= {p.name for p in out.iterdir()}
    for weights in ("raw", "ema"):
        val = metrics["val"][weights]
        assert {"loss", "t100", "t500", "t900", "subset_women", "subset_men"} <= set(val) and all(math.isfinite(v) for v in val.values())
    assert metrics["val"]["raw"] != metrics["val"]["ema"]  # two sets of weights, measured on the same grid
    header = (out / "history.tsv").read_text().splitlines()[0].split("\t")
    assert {"loss", "lr", "epoch", "val_raw_t100", "val_ema_t900"} <= set(header)
    assert {"start", "end"} <= {b.kind for b in t.backups.list()}
    from PIL import Image

    assert Image.open(out / "samples.png").size[0] == 32  # one seed column of 32 px, decoded by the codec
    unet, meta = load_unet(out, "cpu")
    assert meta["ema_weights"] and meta["codec_id"] == t.codec.id and unet.config.in_channels == 32
    # A second validation of the same weights gives the same numbers: the grid is fixed
    assert t.validate()["raw"] == metrics["val"]["raw"]
    # The report stage lists the phase (not the init beside it) with its per-timestep validation
    from stagewise.report import ReportConfig, build_report

    text, report = build_report(ReportConfig(), work / "curated", work / "cache", work / "runs")
    row = report["diffusion"][out.name]
    assert row["parent"] == "init" and row["val_ema_t900"] == metrics["val"]["ema"]["t900"] and "init" not in report["diffusion"]
    assert "## Diffusion" in text and f"| {out.name} | init | 32 |" in text and "t=500" in text


def test_caption_dropout_uses_the_empty_caption_at_the_configured_rate_and_per_subset(work):
    rows = torch.arange(8).repeat(16)  # 128 draws over the 8 training rows
    none, every = trainer(work, caption_dropout=0.0), trainer(work, caption_dropout=1.0)
    assert (none.draw(rows, 0)["caption"] != none.empty).all() and (every.draw(rows, 0)["caption"] == every.empty).all()
    half = trainer(work, caption_dropout=0.5).draw(rows, 0)["caption"]
    assert 0.3 < (half == none.empty).float().mean() < 0.7
    per_subset = trainer(work, caption_dropout=0.0, subsets={"w": {"domain": "a", "caption_dropout": 1.0}, "m": {"domain": "b"}})
    d = per_subset.draw(torch.arange(len(per_subset.data.latents)), 0)
    dropped = d["caption"] == per_subset.empty
    assert dropped[per_subset.data.subset == 0].all() and not dropped[per_subset.data.subset == 1].any()


def test_subsets_select_by_regex_or_domain_with_repeats_and_loss_weights(work):
    t = trainer(work, subsets={"women": {"caption_regex": "woman", "repeats": 3, "loss_weight": 2.0}, "men": {"domain": "b", "repeats": 1}})
    women = sum("woman" in c for c in t.data.train_captions)
    assert t.data.counts == {"women": women, "men": 4} and women in (2, 4)  # held out: one image per domain; flips kept; "girl" is in neither
    rows, _ = t.data.indices(0, len(t.data._epoch(0)))
    per_row = torch.bincount(rows.cpu(), minlength=len(t.data.latents))
    subset = t.data.subset.cpu()
    assert (per_row[subset == 0] == 3).all() and (per_row[subset == 1] == 1).all()  # one epoch = every row x repeats
    assert set(t.draw(torch.arange(6), 0)["weight"].tolist()) == {2.0, 1.0}
    half = trainer(work, subsets={"all": {"caption_regex": "photo", "repeats": 0.5}})
    sizes = [len(half.data._epoch(e)) for e in range(20)]
    assert 0 < min(sizes) and max(sizes) < len(half.data.latents) and 0.3 < sum(sizes) / (20 * len(half.data.latents)) < 0.7


def test_lr_schedules_are_pure_functions_of_images_seen():
    base = dict(parent="init", resolution_px=32, length_kimg=1.0)
    cfg = lambda **kw: parse_diffusion({"stages": {"p": {**base, **kw}}}).stages["p"]  # noqa: E731
    const, cos = cfg(lr_warmup_kimg=0.1), cfg(lr_schedule="cosine", lr_warmup_kimg=0.1, lr_min_ratio=0.1)
    assert lr_factor(0, const) == pytest.approx(0.01) and lr_factor(49, const) == pytest.approx(0.5) and lr_factor(500, const) == 1.0
    assert lr_factor(100, cos) == pytest.approx(1.0) and lr_factor(550, cos) == pytest.approx(0.55) and lr_factor(1000, cos) == pytest.approx(0.1)
    restarts = cfg(lr_schedule="cosine_restarts", lr_cycles=2)
    assert lr_factor(250, restarts) == pytest.approx(0.5) and lr_factor(499, restarts) < 0.01 and lr_factor(500, restarts) == pytest.approx(1.0)


@pytest.mark.parametrize("kind", ["adamw", "lion", "prodigy"])
def test_optimizer_state_resumes_exactly_through_safetensors_and_json(kind, tmp_path):
    from safetensors.torch import save_file

    cfg = parse_diffusion({"stages": {"p": {"parent": "init", "resolution_px": 32, "length_kimg": 1, "optimizer": kind, "lr": 1.0 if kind == "prodigy" else 1e-2}}}).stages["p"]
    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randn(16, 2)

    def fresh():
        torch.manual_seed(1)
        net = torch.nn.Linear(4, 2)
        return net, make_optimizer(list(net.parameters()), cfg, torch.device("cpu"))

    def train(net, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.mse_loss(net(x), y).backward()
            opt.step()

    ref, ref_opt = fresh()
    train(ref, ref_opt, 6)
    net, opt = fresh()
    train(net, opt, 3)
    tensors, meta = optimizer_state(opt, ["weight", "bias"])
    save_file({**tensors, **{f"net.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "s.safetensors")
    (tmp_path / "s.json").write_text(json.dumps(meta))
    if kind == "prodigy":
        assert meta["groups"][0]["d"] > 1e-6 and meta["groups"][0]["k"] == 3  # Prodigy's estimate travels in the JSON
    loaded = load_file(tmp_path / "s.safetensors")
    net2, opt2 = fresh()
    net2.load_state_dict({k[4:]: v for k, v in loaded.items() if k.startswith("net.")})
    load_optimizer_state(opt2, ["weight", "bias"], loaded, json.loads((tmp_path / "s.json").read_text()))
    train(net2, opt2, 3)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), net2.state_dict().values()))


def test_gradient_accumulation_sums_micro_batches_into_one_step(work):
    a = trainer(work, grad_accum=2, batch_size=2, clip_grad=None)
    b = trainer(work, grad_accum=2, batch_size=2, clip_grad=None)
    a.step()
    assert a.images_seen == 4 and a.step_count == 1 and int(a.opt.state[next(a.unet.parameters())]["step"]) == 1
    b.opt.zero_grad()
    for micro in range(2):
        rows, _ = b.data.indices(micro * 2, 2)
        (b.loss(b.draw(rows, micro)) / 2).backward()
    for pa, pb in zip(a.unet.parameters(), b.unet.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6)


def test_gradient_checkpointing_recomputes_with_the_same_gradient(work):
    on, off = trainer(work, gradient_checkpointing=True, clip_grad=None), trainer(work, clip_grad=None)
    assert on.unet.is_gradient_checkpointing and not off.unet.is_gradient_checkpointing
    for t in (on, off):
        t.opt.zero_grad()
        t.loss(t.draw(torch.arange(4), 0)).backward()
    assert all(torch.allclose(p.grad, q.grad, atol=1e-5) for p, q in zip(on.unet.parameters(), off.unet.parameters()))


def test_precisions_autocast_and_fp16_uses_a_grad_scaler(work):
    losses = {}
    for precision in ("fp32", "bf16", "fp16"):
        t = trainer(work, precision=precision)
        losses[precision] = t.loss(t.draw(torch.arange(4), 0)).item()
        assert t.scaler.is_enabled() == (precision == "fp16")
    assert all(math.isfinite(v) for v in losses.values())
    assert losses["bf16"] != losses["fp32"]  # the forward really ran in bfloat16
    t = trainer(work, precision="fp16")
    t.step()
    assert t.tensors()[1]["scaler"]["scale"] > 0  # the scaler's state goes into every backup


def test_v_prediction_and_zero_terminal_snr_with_min_snr_weights_stay_finite(work):
    v = trainer(work, prediction="v_prediction", zero_terminal_snr=True, snr_gamma=5.0)
    eps = trainer(work, prediction="epsilon", zero_terminal_snr=True, snr_gamma=5.0)
    assert v.scheduler.alphas_cumprod[-1] == 0  # zero-terminal SNR: the last timestep is pure noise
    d = v.draw(torch.arange(4), 0)
    assert torch.equal(v.target(d["x0"], d["noise"], d["t"]), v.scheduler.get_velocity(d["x0"], d["noise"], d["t"]))
    assert torch.equal(eps.target(d["x0"], d["noise"], d["t"]), d["noise"])
    t = torch.tensor([0, 100, 500, 999])
    for tr in (v, eps):
        w = tr.snr_weight(t)
        assert torch.isfinite(w).all() and w[-1] == 0 and (w <= 1).all()  # SNR(999) = 0 neither NaNs nor dominates
        d = {**tr.draw(torch.arange(4), 0), "t": t}
        assert math.isfinite(tr.loss(d).item())
    alpha = v.scheduler.alphas_cumprod[0].double()
    assert v.snr_weight(t)[0].item() == pytest.approx(5.0 / (alpha / (1 - alpha) + 1).item(), rel=1e-3)  # min(SNR, 5) / (SNR + 1) at SNR >> 5


def test_offset_noise_adds_a_constant_per_image_and_channel(work):
    plain, offset = trainer(work), trainer(work, offset_noise=0.1)
    a, b = plain.draw(torch.arange(4), 0)["noise"], offset.draw(torch.arange(4), 0)["noise"]
    diff = b - a
    assert diff.abs().max() > 0.01 and torch.allclose(diff, diff[..., :1, :1].expand_as(diff), atol=1e-5)


def test_ema_halflife_in_kimg_does_not_depend_on_the_batch_size(work):
    t = trainer(work, batch_size=2, ema_halflife_kimg=0.01)
    assert t.ema.beta(2) ** 4 == pytest.approx(t.ema.beta(8)) and t.ema.beta(8) == pytest.approx(0.5 ** 0.8)  # 8 images decay the same, in 4 steps or 1
    before = {k: v.clone() for k, v in t.ema.shadow.items()}
    t.step()  # batch 2: the average moved by (1 - beta(2)) of the way to the new weights
    name, p = next((n, p) for n, p in t.unet.named_parameters() if not torch.equal(p, before[n]))
    assert torch.allclose(t.ema.shadow[name], before[name] + (1 - t.ema.beta(2)) * (p.detach() - before[name]), atol=1e-7)


def test_a_run_of_nan_steps_rolls_back_to_the_last_backup_with_a_lower_lr(work, monkeypatch):
    monkeypatch.setenv("STAGEWISE_POISON_STEPS", "0,1")  # the batches of steps 0 and 1 turn NaN, once
    t = trainer(work, guard={"max_bad_steps": 2})
    start = {k: v.clone() for k, v in t.unet.state_dict().items()}
    t.step(), t.step()
    assert all(torch.equal(v, start[k]) for k, v in t.unet.state_dict().items())  # skipped: the weights never saw the NaN
    metrics = t.run()
    events = [e["event"] for e in t.events]
    assert events.count("rollback") == 1 and events[-1] == "finished" and t.lr_scale == 0.5 and metrics["rollbacks"] == 1
    assert all(torch.isfinite(v).all() for v in load_file(str(t.job.out_dir / "unet.safetensors")).values())


# ------------------------------------------------------------------------------------------- codecs


@pytest.mark.parametrize("kind", ["AutoencoderKL", "AutoencoderTiny"])
def test_diffusers_codec_loads_tiny_vaes_applies_their_scale_at_load_time_and_names_the_weights(kind, tmp_path):
    import diffusers

    folder = tiny_vae(tmp_path / "vae", kind, scaling_factor=0.5, shift_factor=0.25 if kind == "AutoencoderKL" else None)
    codec = load_codec(CodecConfig(name="diffusers", weights=str(folder)))
    assert (codec.channels, codec.factor, codec.scale, codec.shift) == (4, 2, 0.5, 0.25 if kind == "AutoencoderKL" else 0.0)
    rgb = torch.rand(1, 3, 16, 16)
    raw = codec.encode(rgb)
    vae = getattr(diffusers, kind).from_pretrained(folder)
    expected = vae.encode(rgb * 2 - 1).latent_dist.mean if kind == "AutoencoderKL" else vae.encode(rgb * 2 - 1).latents
    assert raw.shape == (1, 4, 8, 8) and torch.allclose(raw, expected, atol=1e-6)  # the cache keeps raw latents
    assert torch.allclose(codec.normalize(raw), (raw - codec.shift) * 0.5)
    assert codec.decode(raw).shape == (1, 3, 16, 16)
    other = tiny_vae(tmp_path / "other", kind, scaling_factor=0.5)
    with torch.no_grad():
        for p in (m := getattr(diffusers, kind).from_pretrained(other)).parameters():
            p.add_(0.01)
    m.save_pretrained(other)
    assert load_codec(CodecConfig(name="diffusers", weights=str(other))).id != codec.id != "diffusers"
    # A pipeline layout: the VAE in vae/, found with codec.subfolder (and a hint when it is not set)
    tiny_vae(tmp_path / "pipe" / "vae", kind)
    assert load_codec(CodecConfig(name="diffusers", weights=str(tmp_path / "pipe"), subfolder="vae")).channels == 4
    with pytest.raises(StageError, match=r"codec.weights: no config.json in .*set codec.subfolder: vae"):
        load_codec(CodecConfig(name="diffusers", weights=str(tmp_path / "pipe")))


def test_pretrained_sd_folder_under_a_new_vae_adapts_conv_in_and_conv_out(tmp_path):
    """XLsd's surgery: an SD-layout UNet for 4 latent channels under an 8-channel VAE; then one phase on its cache."""
    sd = tiny_sd_folder(tmp_path / "sd", in_channels=4)
    vae = tiny_vae(tmp_path / "vae", latent_channels=8)
    codec_cfg = {"name": "diffusers", "weights": str(vae)}
    params_file = write_params(tmp_path, {"p": {**P1, "resolution_px": 16}}, codec=codec_cfg, model={"pretrained": str(sd)})
    init_stage(tmp_path, params_file)
    unet, meta = load_unet(tmp_path / "runs" / "init", "cpu")
    original = load_file(sd / "unet" / "diffusion_pytorch_model.safetensors")
    assert unet.conv_in.weight.shape[1] == 8 and unet.conv_out.weight.shape[0] == 8
    assert torch.allclose(unet.conv_in.weight[:, :4] * 2**0.5, original["conv_in.weight"]) and torch.equal(unet.conv_out.weight[:4], original["conv_out.weight"])
    assert torch.equal(unet.conv_out.weight[4:], torch.zeros_like(unet.conv_out.weight[4:]))  # new outputs start at zero
    assert torch.equal(unet.down_blocks[0].resnets[0].conv1.weight, original["down_blocks.0.resnets.0.conv1.weight"])  # the rest is SD's
    codec = load_codec(CodecConfig(**codec_cfg))
    write_cache(tmp_path / "cache", codec, 16)
    cfg = load_diffusion(params_file)
    out = tmp_path / "runs" / "p"
    t = PhaseTrainer(PhaseJob("p", cfg, CodecConfig(**codec_cfg), tmp_path / "runs/init", tmp_path / "runs/init/text", tmp_path / "cache/16", out, out / "backups", False))
    assert math.isfinite(t.run()["val"]["raw"]["loss"]) and (out / "samples.png").exists()


# ---------------------------------------------------------------------------------------- bad input


def test_bad_input_is_a_clear_error_naming_the_key(work, tmp_path):
    with pytest.raises(ParamsError, match=r"diffusion.stages.p1.lr: 0.001 with optimizer prodigy: .*set lr: 1.0"):
        parse_diffusion(params({"p1": {**P1, "optimizer": "prodigy", "lr": 0.001}})["diffusion"])
    with pytest.raises(ParamsError, match=r"diffusion.stages.p1.subsets.x.caption_regex: matches none of the 8 training rows"):
        trainer(work, subsets={"x": {"caption_regex": "astronaut"}})
    with pytest.raises(ParamsError, match=r"diffusion.stages.p2.parent: 'p3' is not an earlier phase"):
        parse_diffusion({"stages": {"p2": {**P1, "parent": "p3"}, "p3": P1}})
    clash = tmp_path / "clash.yaml"  # a phase named like an autoencoder stage: both would write runs/s128
    clash.write_text(json.dumps({**params({"s128": P1}), "train": {"stages": {"s128": {"parent": "init", "resolution_px": 128}}}}))
    with pytest.raises(ParamsError, match=r"diffusion.stages.s128: the name is also a stage of train.stages"):
        load_diffusion(clash)
    sd = tiny_sd_folder(tmp_path / "sd", cross_attention_dim=24)
    with pytest.raises(StageError, match=r"diffusion.model.pretrained: the UNet's cross-attention width is 24, the text encoder's hidden size is 16"):
        init_stage(tmp_path, write_params(tmp_path, {"p1": P1}, model={"pretrained": str(sd)}))
    (sd / "tokenizer").rename(tmp_path / "moved")
    with pytest.raises(StageError, match=r"diffusion.model.pretrained: .* lacks tokenizer/"):
        init_stage(tmp_path, params_file := write_params(tmp_path, {"p1": P1}, model={"pretrained": str(sd)}))
    with pytest.raises(StageError, match=r"diffusion.model.unet.cross_attention_dim: the UNet's cross-attention width is 8, the text encoder's hidden size is 16"):
        init_stage(tmp_path, write_params(tmp_path, {"p1": P1}, model={"unet": {**TINY_UNET, "cross_attention_dim": 8}, "text_encoder": TINY_TEXT}))
    assert not (tmp_path / "runs" / "init").exists()  # nothing written before the checks, nothing left after them
    # A cache made by another codec than the configured one
    pixels_cache = write_cache(tmp_path / "pixels", load_codec(CodecConfig(name="pixels")), 32)
    cfg = parse_diffusion(params({"p1": P1})["diffusion"])
    job = PhaseJob("p1", cfg, CodecConfig(), work / "runs/init", work / "runs/init/text", pixels_cache, tmp_path / "out", tmp_path / "out/backups", False)
    with pytest.raises(StageError, match=r"latents were made by codec pixels but the codec section gives taef2-"):
        PhaseTrainer(job)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------- kill and resume

RESUME = {**P1, "length_kimg": 0.032, "save_every_kimg": 0.008, "optimizer": "prodigy", "lr": 1.0, "lr_schedule": "cosine", "lr_warmup_kimg": 0.008,
          "ema_halflife_kimg": 0.02, "offset_noise": 0.05, "snr_gamma": 5.0, "subsets": {"w": {"domain": "a", "repeats": 1.5, "caption_dropout": 0.3}, "m": {"domain": "b"}}}


def test_killed_phase_resumes_bit_identical_to_an_uninterrupted_run(work):
    """`python -m stages.diffuse` SIGKILLed after its first rolling backup, run again: the same weights, bit for bit
    (UNet, EMA, Prodigy's state and d, data order with fractional repeats, timesteps, noise, dropout, LR schedule)."""
    import os
    import signal
    import subprocess
    import sys

    from test_train_resume import rolling_backups, wait_for

    write_params(work, {"p1": RESUME})
    reference = trainer(work, **{k: v for k, v in RESUME.items() if k not in P1 or P1[k] != v})  # in-process: the same code
    reference.run()
    cmd = [sys.executable, "-m", "stages.diffuse", "--phase", "p1", "--parent", "runs/init", "--text", "runs/init/text", "--cache", "cache/32", "--out", "runs/killed", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    backups = work / "runs" / "killed" / "backups"
    try:
        wait_for(lambda: rolling_backups(backups), 480, proc)  # imports alone take 20-60 s on a busy 2-core machine
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (work / "runs/killed/unet.safetensors").exists()
    done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    events = [json.loads(line)["event"] for line in (work / "runs/killed/events.jsonl").read_text().splitlines()]
    assert events.count("resumed") == 1 and events[-1] == "finished"
    ours, theirs = load_file(str(work / "runs/killed/unet.safetensors")), load_file(str(reference.job.out_dir / "unet.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    ours, theirs = (json.loads((d / "metrics.json").read_text())["val"] for d in (work / "runs/killed", reference.job.out_dir))
    assert ours == theirs


def test_the_sd15_xlsd_profile_is_a_valid_recipe():
    import yaml

    profile = yaml.safe_load((ROOT / "profiles" / "sd15-xlsd.yaml").read_text())
    cfg = parse_diffusion(profile["diffusion"])
    assert [(n, p.resolution_px, p.optimizer) for n, p in cfg.stages.items()] == [("p256", 256, "prodigy"), ("p512", 512, "lion"), ("p512_people", 512, "lion")]
    assert cfg.stages["p512"].ema_halflife_kimg and cfg.model.pretrained and CodecConfig(**profile["codec"]).name == "diffusers"
    assert set(r for r in profile["cache"]["resolutions"]) >= {p.resolution_px for p in cfg.stages.values()}


@pytest.mark.slow  # ~4 stage processes at ~20 s of imports each on a busy 2-core machine
def test_dvc_reruns_only_the_edited_phase_and_its_descendants(tmp_path):
    import re

    import yaml

    from conftest import dvc, make_project, set_params

    recipe = {"p1": P1, "p2": {**P1, "parent": "p1"}, "q": {**P1, "subsets": {"b": {"domain": "b"}}}}
    project = make_project(tmp_path / "project", {"codec": {"name": "taef2"}, "diffusion": {"model": {"unet": TINY_UNET, "text_encoder": TINY_TEXT}}})
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["diffusion"]["defaults"], params["diffusion"]["stages"] = TINY_PHASE_DEFAULTS, recipe  # replaced, not merged
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dag = yaml.safe_load((project / "dvc.yaml").read_text())
    dag["stages"] = {k: v for k, v in dag["stages"].items() if k in ("diffuse_init", "diffuse")}
    dag.pop("plots", None)
    (project / "dvc.yaml").write_text(yaml.safe_dump(dag, sort_keys=False))
    write_cache(project / "data" / "cache", load_codec(CodecConfig()), 32)
    ran = lambda proc: re.findall(r"Running stage '([^']+)'", proc.stdout + proc.stderr)  # noqa: E731
    assert ran(dvc(project, "repro")) == ["diffuse_init", "diffuse@p1", "diffuse@p2", "diffuse@q"]
    for phase in recipe:
        metrics = json.loads((project / "runs" / phase / "metrics.json").read_text())
        assert {"t100", "t500", "t900"} <= set(metrics["val"]["raw"]) and (project / "runs" / phase / "samples.png").exists()
        assert list((project / "runs" / phase / "backups").glob("*/end-*.json"))
    set_params(project / "params.yaml", {"diffusion": {"stages": {"p1": {"lr": 0.002}}}})
    assert ran(dvc(project, "repro")) == ["diffuse@p1", "diffuse@p2"]
    assert "Data and pipelines are up to date." in dvc(project, "status").stdout
