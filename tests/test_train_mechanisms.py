"""The training mechanisms the loop calls: losses, random warp / flip, learning-rate dropout, EMA, GAN.

Each test pins one behaviour and fails without it. Tensors are tiny; the whole file runs in seconds."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from stagewise.config import ParamsError, parse_section
from stagewise.train import losses
from stagewise.train.ema import EMA
from stagewise.train.gan import (
    GanConfig,
    d_loss,
    frozen,
    g_loss,
    make_discriminator,
)
from stagewise.train.losses import (
    LOSSES,
    LossWeights,
    focal_frequency,
    ms_ssim_loss,
    ms_ssim_scales,
    reconstruction_loss,
    ssim_loss,
)
from stagewise.train.lrd import LRDropout
from stagewise.train.state import make_optimizer
from stagewise.train.warp import WarpConfig, random_flip, random_warp, warp_grid


def _pair(channels=3, size=32, seed=0, noise=0.3):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(2, channels, size, size, generator=g) * 2 - 1
    # a smooth image-like target (SSIM on white noise is degenerate) plus a noisy prediction
    target = nn.functional.avg_pool2d(target, 3, stride=1, padding=1)
    pred = target + noise * torch.randn(target.shape, generator=g)
    return pred, target


# ----------------------------------------------------------------------------------------------- losses


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("channels", [3, 32])
def test_loss_zero_for_identical_positive_otherwise_and_differentiable(name, channels):
    fn = LOSSES[name]
    pred, target = _pair(channels)
    assert fn(target.clone(), target).abs().item() < 1e-5
    pred.requires_grad_(True)
    value = fn(pred, target)
    assert value.dim() == 0 and value.item() > 1e-3
    value.backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_losses_grow_with_the_error():
    _, target = _pair()
    noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(1))
    for name, fn in LOSSES.items():
        small, large = fn(target + 0.05 * noise, target), fn(target + 0.5 * noise, target)
        assert large > small, name


def test_ms_ssim_uses_fewer_scales_on_small_latents():
    assert [ms_ssim_scales(s) for s in (16, 32, 64, 128, 176, 512)] == [1, 2, 3, 4, 5, 5]
    pred, target = _pair(channels=32, size=16)
    pred.requires_grad_(True)
    value = ms_ssim_loss(pred, target)  # 16 px: one scale, so it is plain SSIM
    assert torch.allclose(value, ssim_loss(pred, target))
    value.backward()
    assert torch.isfinite(pred.grad).all()
    big_pred, big_target = _pair(size=64)
    assert not torch.allclose(ms_ssim_loss(big_pred, big_target), ssim_loss(big_pred, big_target))


def test_ms_ssim_gradients_stay_finite_for_anticorrelated_images():
    _, target = _pair(size=64)
    pred = (-target).requires_grad_(True)  # negative contrast-structure terms at every scale
    ms_ssim_loss(pred, target).backward()
    assert torch.isfinite(pred.grad).all()


def test_focal_frequency_weights_are_detached():
    pred, target = _pair()
    pred.requires_grad_(True)
    focal_frequency(pred, target).backward()

    def reference(detach: bool):
        p = pred.detach().clone().requires_grad_(True)
        diff = torch.fft.fft2(p, norm="ortho") - torch.fft.fft2(target, norm="ortho")
        distance = diff.real**2 + diff.imag**2
        weight = distance.sqrt()
        weight = weight / weight.amax(dim=(-2, -1), keepdim=True)
        (((weight.detach() if detach else weight)) * distance).mean().backward()
        return p.grad

    assert torch.allclose(pred.grad, reference(detach=True), rtol=1e-4, atol=1e-9)
    assert not torch.allclose(pred.grad, reference(detach=False), rtol=1e-2)  # the test can tell the two apart


def test_loss_weights_validation():
    assert LossWeights().active() == {"mse": 1.0}
    with pytest.raises(ParamsError, match="at least one loss weight must be > 0"):
        parse_section({"mse": 0.0}, LossWeights, "train.stages.s128.loss")
    with pytest.raises(ParamsError, match=r"train\.stages\.s128\.loss\.l1: .*greater than or equal to 0"):
        parse_section({"l1": -1.0}, LossWeights, "train.stages.s128.loss")
    with pytest.raises(ParamsError, match="unknown key.*focal_frequency"):
        parse_section({"fft": 1.0}, LossWeights, "train.stages.s128.loss")


def test_reconstruction_loss_sums_only_the_weighted_losses(monkeypatch):
    pred, target = _pair()
    weights = LossWeights(mse=1.0, ms_ssim=0.5, focal_frequency=2.0)

    def never(*args, **kwargs):
        raise AssertionError("a loss with weight 0 was computed")

    monkeypatch.setitem(LOSSES, "l1", never)
    monkeypatch.setitem(LOSSES, "log_cosh", never)
    total, parts = reconstruction_loss(pred, target, weights)
    assert set(parts) == {"mse", "ms_ssim", "focal_frequency"}
    expected = losses.mse(pred, target) + 0.5 * ms_ssim_loss(pred, target) + 2.0 * focal_frequency(pred, target)
    assert torch.allclose(total, expected)
    assert not any(v.requires_grad for v in parts.values())


def test_losses_never_read_values_back_to_the_host():
    # Meta tensors have no data: any .item(), bool() or host copy would raise.
    pred = torch.empty(2, 32, 16, 16, device="meta", requires_grad=True)
    target = torch.empty(2, 32, 16, 16, device="meta")
    weights = LossWeights(**{name: 1.0 for name in LOSSES})
    total, parts = reconstruction_loss(pred, target, weights)
    total.backward()
    assert total.device.type == "meta" and pred.grad.device.type == "meta" and len(parts) == len(LOSSES)


# ------------------------------------------------------------------------------------------------- warp


def _image(n=4, channels=3, size=64, seed=0):
    # smooth content so that a displaced sample is visibly different from the original
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, channels, 8, 8, generator=g) * 2 - 1
    return nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_random_warp_changes_the_input_and_is_deterministic():
    x = _image()
    a = random_warp(x, _gen(1))
    assert a.shape == x.shape and torch.isfinite(a).all()
    assert (a - x).abs().mean() > 0.01
    assert torch.equal(a, random_warp(x, _gen(1)))
    assert not torch.equal(a, random_warp(x, _gen(2)))
    same = random_warp(x[:1].expand(4, -1, -1, -1), _gen(1))
    assert not torch.equal(same[0], same[1])  # each image of a batch gets its own warp
    g = _gen(1)
    first, second = random_warp(x, g), random_warp(x, g)
    assert not torch.equal(first, second)  # the generator advances between batches


def test_random_warp_is_identity_when_all_strengths_are_zero():
    off = WarpConfig(rotation_deg=0, scale=0, translation=0, strength=0)
    latents = _image(channels=32, size=16)
    assert torch.allclose(random_warp(latents, _gen(0), off), latents, atol=1e-5)
    pixels = _image(n=2, size=96)[..., :80]  # larger than the grid's build size, not square
    assert torch.allclose(random_warp(pixels, _gen(0), off), pixels, atol=1e-5)


def test_warp_field_is_smooth_with_fixed_borders():
    n, size = 8, 64
    cfg = WarpConfig(rotation_deg=0, scale=0, translation=0)  # the smooth random field alone
    identity = warp_grid(n, size, size, _gen(0), cfg.model_copy(update={"strength": 0.0}), "cpu")
    field = warp_grid(n, size, size, _gen(0), cfg, "cpu") - identity
    assert field.abs().amax() > 0.02  # it moves things
    edges = torch.cat([field[:, 0], field[:, -1], field[:, :, 0], field[:, :, -1]], dim=1)
    assert edges.abs().amax() < 1e-6  # border control points stay put, as in DFL
    step = (field[:, 1:] - field[:, :-1]).abs().amax()
    assert step < 0.15 * field.abs().amax()  # neighbouring pixels move nearly together: smooth, not noise


def test_affine_jitter_stays_in_its_ranges():
    n, size = 256, 32
    cfg = WarpConfig(strength=0.0)  # affine part only
    grid = warp_grid(n, size, size, _gen(0), cfg, "cpu")
    # The grid is p -> A p + t: the sample position of the image centre is t.
    centre = (grid[:, size // 2 - 1, size // 2 - 1] + grid[:, size // 2, size // 2]) / 2
    assert centre.abs().amax() <= 2 * cfg.translation + 1e-4 and centre.abs().amax() > 0.5 * cfg.translation
    # Moving one pixel right in the output moves the sample by (cos, sin) / zoom pixels.
    dx = (grid[:, :, 1:] - grid[:, :, :-1]).mean(dim=(1, 2)) * size / 2
    zoom = 1 / dx.norm(dim=-1)
    angle = torch.rad2deg(torch.atan2(dx[:, 1], dx[:, 0]))
    assert (zoom - 1).abs().amax() <= cfg.scale + 1e-3 and (zoom - 1).abs().amax() > cfg.scale / 2
    assert angle.abs().amax() <= cfg.rotation_deg + 1e-2 and angle.abs().amax() > cfg.rotation_deg / 2


def test_warp_creates_every_tensor_on_the_input_device():
    # With the default device set to "meta", any tensor made without device=x.device would be a meta
    # tensor and mixing it with x would raise; so this proves no implicit host tensors or copies.
    x = _image(channels=32, size=16)
    expected = random_warp(x, _gen(3))
    with torch.device("meta"):
        out = random_warp(x, _gen(3))
        flipped = random_flip(x, _gen(3))
    assert out.device == x.device and torch.equal(out, expected) and flipped.device == x.device


def test_warp_rejects_a_generator_on_another_device():
    with pytest.raises(ValueError, match="generator lives on"):
        random_warp(torch.empty(1, 3, 8, 8, device="meta"), _gen(0))


def test_random_flip():
    x = _image(n=64)
    assert torch.equal(random_flip(x, _gen(0), p=0.0), x)
    assert torch.equal(random_flip(x, _gen(0), p=1.0), x.flip(-1))
    out = random_flip(x, _gen(0))
    flipped = torch.tensor([torch.equal(o, f) for o, f in zip(out, x.flip(-1))])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, x)])
    assert (flipped | kept).all() and 16 < flipped.sum() < 48
    assert torch.equal(out, random_flip(x, _gen(0)))


# -------------------------------------------------------------------------------------------------- LRD


def _lrd_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 32))


def _grads(model, steps, seed=5):
    """A fixed gradient sequence, independent of the weights, so two runs can see the same gradients."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=g) for p in model.parameters()] for _ in range(steps)]


def _run(model, grads, lrd: LRDropout | None, lr=1e-2):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    history = []
    for step_grads in grads:
        before = [p.detach().clone() for p in model.parameters()]
        for p, grad in zip(model.parameters(), step_grads):
            p.grad = grad.clone()
        if lrd is None:
            opt.step()
        else:
            lrd.step(opt)
        history.append(before)
    return opt, history


def test_lrd_keep_prob_one_is_the_plain_optimizer():
    plain, masked = _lrd_model(), _lrd_model()
    grads = _grads(plain, 4)
    _run(plain, grads, None)
    _run(masked, grads, LRDropout(1.0, _gen(0)))
    for a, b in zip(plain.parameters(), masked.parameters()):
        assert torch.equal(a, b)


def test_lrd_masks_the_update_but_adam_state_sees_every_gradient():
    keep = 0.3
    plain, masked = _lrd_model(), _lrd_model()
    grads = _grads(plain, 5)
    _run(plain, grads[:1], None)
    reference_after_one = [p.detach().clone() for p in plain.parameters()]
    _, history = _run(masked, grads[:1], LRDropout(keep, _gen(0)))
    changed_total, elements = 0, 0
    for before, after, full in zip(history[0], masked.parameters(), reference_after_one):
        changed = after != before
        # every element is either exactly the optimizer's update or exactly its old value
        assert torch.equal(after, torch.where(changed, full, before))
        assert (full != before).all()  # Adam moved every element, so an unchanged one was masked out
        changed_total += int(changed.sum())
        elements += before.numel()
    assert abs(changed_total / elements - keep) < 0.02  # about keep_prob of the elements moved (n = 6 176)

    # Over several steps the weights diverge from the plain run, but Adam's moments do not.
    masked = _lrd_model()
    masked_opt, _ = _run(masked, grads, LRDropout(keep, _gen(0)))
    reference = _lrd_model()
    plain_opt, _ = _run(reference, grads, None)
    for p_masked, p_plain in zip(masked.parameters(), reference.parameters()):
        s_masked, s_plain = masked_opt.state[p_masked], plain_opt.state[p_plain]
        assert torch.equal(s_masked["exp_avg_sq"], s_plain["exp_avg_sq"])
        assert torch.equal(s_masked["exp_avg"], s_plain["exp_avg"])
        assert not torch.equal(p_masked, p_plain)


def test_lrd_is_deterministic_resumable_and_reuses_buffers():
    grads = _grads(_lrd_model(), 4)
    a, b = _lrd_model(), _lrd_model()
    lrd_a = LRDropout(0.5, _gen(7))
    _run(a, grads, lrd_a)
    _run(b, grads, LRDropout(0.5, _gen(7)))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    pointers = {id(p): lrd_a._snapshots[p].data_ptr() for p in a.parameters()}
    _run(a, grads[:1], lrd_a)
    assert {id(p): lrd_a._snapshots[p].data_ptr() for p in a.parameters()} == pointers

    # state_dict round trip: a restored dropout draws the same masks as the original
    state = {k: v.clone() for k, v in lrd_a.state_dict().items()}
    c, d = copy.deepcopy(a), copy.deepcopy(a)
    _run(c, grads[:2], lrd_a)
    restored = LRDropout(0.5, torch.Generator())
    restored.load_state_dict(state)
    _run(d, grads[:2], restored)
    assert all(torch.equal(x, y) for x, y in zip(c.parameters(), d.parameters()))


def test_lrd_leaves_frozen_parameters_alone():
    model = _lrd_model()
    model[0].requires_grad_(False)
    frozen_before = [p.detach().clone() for p in model[0].parameters()]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    lrd = LRDropout(0.3, _gen(0))
    model(torch.randn(4, 64)).square().mean().backward()
    lrd.step(opt)
    assert all(torch.equal(p, q) for p, q in zip(model[0].parameters(), frozen_before))
    assert all(p not in lrd._snapshots for p in model[0].parameters())
    assert all(p in lrd._snapshots for p in model[1].parameters())


def test_lrd_respects_a_skipped_step():
    model = _lrd_model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    LRDropout(0.3, _gen(0)).step(opt, step_fn=lambda: None)  # e.g. a grad scaler skipping an inf step
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


# -------------------------------------------------------------------------------------------------- EMA


def test_ema_halflife_counts_images_not_steps():
    for batch in (10, 25, 50):
        model = nn.Linear(4, 4)
        nn.init.zeros_(model.weight)
        ema = EMA(model, halflife_kimg=0.1)  # 100 images
        nn.init.ones_(model.weight)
        for _ in range(100 // batch):
            ema.update(model, batch)
        assert ema.images_seen == 100
        assert torch.allclose(ema.shadow["weight"], torch.full((4, 4), 0.5), atol=1e-6), batch
    assert math.isclose(EMA(model, halflife_kimg=1.0).beta(1000), 0.5)


def test_ema_rampup_shortens_the_early_halflife():
    model = nn.Linear(2, 2)
    ramped, plain = EMA(model, 10.0, rampup_ratio=0.05), EMA(model, 10.0)
    assert ramped.beta(10) < plain.beta(10)
    ramped.images_seen = 10_000_000  # late in training the configured half-life rules
    assert math.isclose(ramped.beta(10), plain.beta(10))


class _Grown(nn.Module):
    def __init__(self, grown: bool):
        super().__init__()
        self.old = nn.Linear(4, 4)
        self.extra = nn.Linear(4, 4) if grown else None


def test_ema_follows_a_growing_model_and_frozen_parameters():
    small = _Grown(False)
    ema = EMA(small, halflife_kimg=0.01)
    with torch.no_grad():
        small.old.weight.add_(1.0)
    ema.update(small, 5)  # the average lags behind the model
    lagging = ema.shadow["old.weight"].clone()
    assert not torch.allclose(lagging, small.old.weight)

    big = _Grown(True)
    big.old.load_state_dict(small.old.state_dict())  # growth copies every existing weight
    big.old.bias.requires_grad_(False)  # and freezes some of them
    with torch.no_grad():
        big.old.bias.add_(3.0)  # (a frozen tensor that the average had not seen yet)
    ema.update(big, 5)
    assert set(ema.shadow) == {"old.weight", "old.bias", "extra.weight", "extra.bias"}
    assert torch.equal(ema.shadow["extra.weight"], big.extra.weight)  # new: starts from the model
    assert not torch.allclose(ema.shadow["old.weight"], big.old.weight)  # old: keeps its history
    assert not torch.allclose(ema.shadow["old.weight"], lagging)  # ... and keeps averaging
    assert torch.equal(ema.shadow["old.bias"], big.old.bias)  # frozen: bit-identical to the model

    ema.update(small, 5)  # a parameter that went away is dropped
    assert set(ema.shadow) == {"old.weight", "old.bias"}

    widened = _Grown(False)
    widened.old = nn.Linear(4, 8)  # same name, new shape: restarts from the model
    ema.update(widened, 5)
    assert torch.equal(ema.shadow["old.weight"], widened.old.weight)


def test_ema_state_dict_goes_through_safetensors(tmp_path):
    model = nn.Linear(4, 4)
    ema = EMA(model, halflife_kimg=0.01)
    with torch.no_grad():
        model.weight.mul_(2)
    ema.update(model, 3)
    save_file(ema.state_dict(), str(tmp_path / "ema.safetensors"))
    restored = EMA(nn.Linear(4, 4), halflife_kimg=0.01)
    restored.load_state_dict(load_file(str(tmp_path / "ema.safetensors")))
    assert restored.images_seen == 3
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    ema.copy_to(a)
    restored.copy_to(b)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.weight, ema.shadow["weight"])

    own = model.weight.detach().clone()
    with ema.applied(model):
        assert torch.equal(model.weight, ema.shadow["weight"])
    assert torch.equal(model.weight, own)


# -------------------------------------------------------------------------------------------------- GAN


@pytest.mark.parametrize("channels,size", [(3, 64), (32, 16)])
def test_discriminator_gives_a_patch_logit_map(channels, size):
    cfg = GanConfig(width=8, layers=3)
    disc = make_discriminator(channels, cfg)
    logits = disc(torch.randn(2, channels, size, size))
    assert logits.shape == (2, 1, size // 8, size // 8)
    with pytest.raises(ValueError, match="at least 8 px"):
        disc(torch.randn(1, channels, 4, 4))


@pytest.mark.parametrize("kind", ["hinge", "nonsat"])
def test_gan_losses_signs_and_gradients(kind):
    high, low = torch.full((2, 1, 4, 4), 2.0), torch.full((2, 1, 4, 4), -2.0)
    assert d_loss(high, low, kind) < d_loss(low, high, kind)  # D is rewarded for telling real from fake
    assert g_loss(high, kind) < g_loss(low, kind)  # G is rewarded when D calls its output real
    real = torch.zeros(2, 1, 4, 4, requires_grad=True)
    fake = torch.zeros(2, 1, 4, 4, requires_grad=True)
    d_loss(real, fake, kind).backward()
    assert (real.grad < 0).all() and (fake.grad > 0).all()  # D pushes real logits up, fake down
    fake_g = torch.zeros(2, 1, 4, 4, requires_grad=True)
    g_loss(fake_g, kind).backward()
    assert (fake_g.grad < 0).all()  # G pushes fake logits up


def test_gan_step_trains_the_discriminator_with_its_own_optimizer(tmp_path):
    torch.manual_seed(0)
    generator = nn.Conv2d(3, 3, 3, padding=1)
    cfg = GanConfig(width=8, layers=2)
    disc = make_discriminator(3, cfg)
    d_opt = make_optimizer(list(disc.parameters()), "adam", cfg.lr, cfg.betas, cfg.eps, 0.0, torch.device("cpu"))  # the loop's D optimizer
    g_opt = torch.optim.Adam(generator.parameters(), lr=1e-3)
    real = torch.randn(2, 3, 16, 16)
    g_before = copy.deepcopy(generator.state_dict())
    d_before = copy.deepcopy(disc.state_dict())

    fake = generator(real)
    d_opt.zero_grad(set_to_none=True)
    value = d_loss(disc(real), disc(fake.detach()), cfg.loss)  # the loop's D term: fake detached
    value.backward()
    d_opt.step()
    value = value.detach()
    assert value.dim() == 0 and not value.requires_grad
    assert any(not torch.equal(d_before[k], v) for k, v in disc.state_dict().items())
    assert all(torch.equal(g_before[k], v) for k, v in generator.state_dict().items())
    assert all(p.grad is None for p in generator.parameters())

    d_mid = {k: v.detach().clone() for k, v in disc.named_parameters()}  # (spectral norm's u, v buffers move on every forward)
    d_opt.zero_grad(set_to_none=True)
    with frozen(disc):
        (0.1 * g_loss(disc(fake), cfg.loss)).backward()  # gan_power 0.1
    assert all(p.grad is None for p in disc.parameters())  # D got nothing from G's loss
    assert all(p.requires_grad for p in disc.parameters())  # and is trainable again
    g_opt.step()
    assert any(not torch.equal(g_before[k], v) for k, v in generator.state_dict().items())
    assert all(torch.equal(d_mid[k], v) for k, v in disc.named_parameters())
    save_file({k: v.contiguous() for k, v in disc.state_dict().items()}, str(tmp_path / "d.safetensors"))
