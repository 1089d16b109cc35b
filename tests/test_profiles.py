"""Profiles (profiles/<name>.yaml, `make profile`): merged into params.yaml with comments kept, validated
before anything is written, and every profile's models build, grow and take an optimizer step on TAEF2-shaped latents."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from stagewise.config import ParamsError, load_section, read_params
from stagewise.models import ModelConfig, grow, init_model
from stagewise.models.autoencoder import build
from stagewise.profiles import apply_profile, available
from stagewise.train.recipe import parse_train
from stagewise.train.state import make_optimizer

PROFILES = ROOT / "profiles"


@pytest.fixture()
def params(tmp_path) -> Path:
    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    return path


def test_required_profiles_exist():
    assert {"demo", "liae-256", "df-512"} <= set(available(PROFILES))


def test_merge_keeps_comments_and_demo_restores_params(params):
    original = params.read_text()
    apply_profile("liae-256", params, PROFILES)
    merged = params.read_text()
    model = load_section("model", ModelConfig, params)
    assert (model.inter, model.decoders, model.half_res, model.pixel_norm) == ("liae", "shared", True, True)
    train = parse_train(read_params(params)["train"])
    assert train.stages["s128"].lr == 5e-5 and train.stages["s256"].length_kimg >= 100
    # untouched sections keep their comments and spelling (null stays null, quotes stay)
    for line in ("  threshold: 0.009  # text score above this is rejected", '      reject: ["yes"]', "  weights: null  # folder with taef2_encoder.pth"):
        assert line in merged, line
    apply_profile("demo", params, PROFILES)
    assert params.read_text() == original  # the demo profile is today's params.yaml


def test_bad_profile_names_the_key_and_writes_nothing(params, tmp_path):
    original = params.read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  inter: liae\n  decoders: split\n")
    with pytest.raises(ParamsError, match=r"model.*decoders: shared"):
        apply_profile(str(bad), params, PROFILES)
    bad.write_text("trian:\n  stages: {}\n")
    with pytest.raises(ParamsError, match="trian: not a params.yaml section"):
        apply_profile(str(bad), params, PROFILES)
    with pytest.raises(ParamsError, match="no such profile; available: .*liae-256"):
        apply_profile("nope", params, PROFILES)
    assert params.read_text() == original


@pytest.mark.slow  # 24 M parameters up to 512 px: 320-500 s on the loaded 2-core CPU, over the default suite's budget
@pytest.mark.parametrize("profile", ["liae-256", "df-512"])
def test_profile_models_build_grow_and_train_a_step(profile, params):
    """The GPU profiles at tiny length: the init model and its growths to every recipe resolution, each
    one Adam step (the stage's lr) on TAEF2-shaped latents at batch 1, which changes its weights."""
    apply_profile(profile, params, PROFILES)
    model_cfg = load_section("model", ModelConfig, params)
    train = parse_train(read_params(params)["train"])
    channels, factor = 32, 8  # TAEF2's latent shape: building needs no weights
    model = init_model(model_cfg, channels, factor)
    for px in sorted({s.resolution_px for s in train.stages.values()}):
        if px > model.resolution_px:
            model = grow(model)
        assert model.resolution_px == px
        stage = next(s for s in train.stages.values() if s.resolution_px == px)
        opt = make_optimizer(list(model.parameters()), stage.optimizer, stage.lr, stage.betas, stage.eps, stage.weight_decay, torch.device("cpu"))
        x = torch.randn(1, channels, px // factor, px // factor)
        before = {k: v.clone() for k, v in model.named_parameters()}
        loss = sum((model(x, d) - x).square().mean() for d in "ab")
        loss.backward()
        opt.step()
        assert all(not torch.equal(before[k], v) for k, v in model.named_parameters() if v.grad is not None)
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("profile", ["liae-256", "df-512"])
def test_profile_models_build_grow_and_backprop_on_the_meta_device(profile, params):
    """The default suite's cheap half of the slow test above: every profile model and its growths are built
    on the meta device (shapes only: no memory, no arithmetic), and a forward + backward at each recipe
    resolution reaches every parameter of the level in use. A shape error in any profile turns this red."""
    apply_profile(profile, params, PROFILES)
    model_cfg = load_section("model", ModelConfig, params)
    train = parse_train(read_params(params)["train"])
    channels, factor = 32, 8  # TAEF2's latent shape
    with torch.device("meta"):
        model = build({"model": model_cfg.model_dump(mode="json"), "channels": channels, "factor": factor, "resolution_px": model_cfg.resolution_px}, "meta")
        for px in sorted({s.resolution_px for s in train.stages.values()}):
            if px > model.resolution_px:
                model = grow(model)
            assert model.resolution_px == px
            x = torch.randn(1, channels, px // factor, px // factor)
            for d in "ab":
                assert model(x, d).shape == x.shape
            sum(model(x, d).square().mean() for d in "ab").backward()
            unused = {n for n, p in model.named_parameters() if p.grad is None}
            # only the parents' input / output blocks (kept for the fade-in) sit idle at fade 1
            assert all(".inputs." in n or ".outputs." in n for n in unused), sorted(unused)[:5]
            model.zero_grad(set_to_none=True)
