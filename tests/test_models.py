"""The two-domain autoencoder: shapes in any codec, swap wiring, growth that keeps every parent tensor."""

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from stagewise.models import Autoencoder, ModelConfig, grow, init_model

TINY = dict(resolution_px=16, bottleneck_px=4, channel_base=64, channel_max=16, channel_min=8, ae_dims=32)


def tiny(**overrides) -> ModelConfig:
    return ModelConfig(**{**TINY, **overrides})


@pytest.mark.parametrize("channels, factor, image_px", [(3, 1, 16), (32, 8, 128)])
def test_shapes_follow_the_codec(channels, factor, image_px):
    model = init_model(tiny(resolution_px=image_px), channels, factor)
    latent_px = image_px // factor
    x = torch.randn(2, channels, latent_px, latent_px)
    assert model(x, "a").shape == x.shape
    assert model(x, "b").shape == x.shape


def test_growth_copies_every_parent_tensor():
    parent = init_model(tiny(), 3, 1)
    child = grow(parent)
    assert child.resolution_px == 2 * parent.resolution_px
    parent_state, child_state = parent.state_dict(), child.state_dict()
    for name, tensor in parent_state.items():
        assert name in child_state, name
        assert torch.equal(child_state[name], tensor), name
    added = set(child_state) - set(parent_state)
    # Exactly one new level: an input and a down block in the encoder, an up and an output block per decoder.
    assert {".".join(n.split(".")[:3]) for n in added} == {
        "encoder.inputs.32", "encoder.blocks.32", "decoder_a.blocks.32", "decoder_a.outputs.32", "decoder_b.blocks.32", "decoder_b.outputs.32"
    }
    assert child.new_names() == added
    assert child.old_names() == set(parent_state)
    x = torch.randn(2, 3, 32, 32)
    assert child(x, "a").shape == x.shape
    # Growing twice keeps everything too, and is reproducible: new blocks are seeded from (seed, size).
    grandchild = grow(child)
    assert set(child_state) < set(grandchild.state_dict())
    again = grow(grow(parent))
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in grandchild.state_dict().items())


def test_fade_in_starts_from_the_parent():
    """At fade 0 the grown model is the parent on the half-size input, upsampled: nothing learned is lost."""
    torch.manual_seed(0)
    parent = init_model(tiny(), 3, 1)
    child = grow(parent, fade=0.0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = F.interpolate(parent(F.avg_pool2d(x, 2), "b"), scale_factor=2.0, mode="nearest")
        torch.testing.assert_close(child(x, "b"), expected)
        child.fade = 1.0
        assert not torch.allclose(child(x, "b"), expected)


@pytest.mark.parametrize(
    "inter, decoders, parts",
    [("shared", "split", {"encoder", "inter", "decoder_a", "decoder_b"}), ("split", "shared", {"encoder", "inter_a", "inter_b", "decoder"}), ("split", "split", {"encoder", "inter_a", "inter_b", "decoder_a", "decoder_b"})],
)
def test_swap_decodes_with_the_other_domain(inter, decoders, parts):
    model = init_model(tiny(inter=inter, decoders=decoders), 3, 1).eval()
    assert {n.split(".")[0] for n, _ in model.named_parameters()} == parts
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        h = model.encoder(x)
        inter_b = model.inter if inter == "shared" else model.inter_b
        decoder_b = model.decoder if decoders == "shared" else model.decoder_b
        torch.testing.assert_close(model(x, "b"), decoder_b(inter_b(h)))  # A -> B: A's features, B's parts
        assert not torch.allclose(model(x, "a"), model(x, "b"))


def test_config_errors_are_clear():
    with pytest.raises(ValidationError, match="no swap"):
        tiny(inter="shared", decoders="shared")
    with pytest.raises(ValidationError, match="power of two"):
        tiny(resolution_px=96)
    with pytest.raises(ValueError, match="bottleneck_px"):
        Autoencoder(tiny(resolution_px=16), 32, 8)  # 2 latent px is below the 4 px bottleneck
    with pytest.raises(ValueError, match="domain"):
        init_model(tiny(), 3, 1)(torch.randn(1, 3, 16, 16), "c")


# --- The family's shapes: LIAE, residual decoder blocks, pixel-shuffle upsampling, bottleneck size, -u, -d

SHAPES = {
    "df": dict(inter="shared", decoders="split"),
    "liae": dict(inter="liae", decoders="shared"),
    "res-shuffle": dict(inter="split", decoders="split", decoder_res_blocks=1, upsample="pixel_shuffle"),
    "liae-ud": dict(inter="liae", decoders="shared", pixel_norm=True, half_res=True, decoder_res_blocks=1, upsample="pixel_shuffle"),
    "df-d-bottleneck2": dict(inter="shared", decoders="split", half_res=True, bottleneck_px=2),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_grows_keeping_its_parent(shape):
    """Output shape at both sizes, every parent tensor copied by growth, new_names = exactly the added ones,
    and (fade 0) the grown model is the parent on the half-size input: for each shape of the family."""
    torch.manual_seed(0)
    parent = init_model(tiny(**SHAPES[shape]), 3, 1)
    x = torch.randn(2, 3, 16, 16)
    assert parent(x, "a").shape == x.shape and parent(x, "b").shape == x.shape
    child = grow(parent, fade=0.0)
    parent_state, child_state = parent.state_dict(), child.state_dict()
    assert all(torch.equal(child_state[k], v) for k, v in parent_state.items())
    assert child.new_names() == set(child_state) - set(parent_state)
    assert child.old_names() == set(parent_state)
    big = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for domain in "ab":
            expected = F.interpolate(parent(F.avg_pool2d(big, 2), domain), scale_factor=2.0, mode="nearest")
            torch.testing.assert_close(child(big, domain), expected)
        child.fade = 1.0
        assert child(big, "a").shape == big.shape
        # the fade-in's parent path reads real half-size inputs when given, and reports its own output
        child.fade = 0.0
        y, y_old = child.decode(child.encode(big, x_half=F.avg_pool2d(big, 2)), "a", with_parent=True)
        torch.testing.assert_close(y_old, parent(F.avg_pool2d(big, 2), "a"))


def test_liae_wiring_is_dfls():
    """A -> [AB, AB], B -> [B, AB] into one decoder; the swap of B into A's style is [AB, AB] of B."""
    model = init_model(tiny(**SHAPES["liae"]), 3, 1).eval()
    assert {n.split(".")[0] for n, _ in model.named_parameters()} == {"encoder", "inter_AB", "inter_B", "decoder"}
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        h = model.encoder(x)
        ab, b = model.inter_AB(h), model.inter_B(h)
        torch.testing.assert_close(model(x, "a"), model.decoder(torch.cat([ab, ab], 1)))
        torch.testing.assert_close(model(x, "b"), model.decoder(torch.cat([b, ab], 1)))
    with pytest.raises(ValidationError, match="decoders: shared"):
        tiny(inter="liae", decoders="split")


def test_archi_options_change_what_they_say():
    """-u normalises the code; -d runs the decoder's last level at half size (its top block is 8 px for a
    16 px latent) and doubles it by depth-to-space; residual blocks and pixel shuffle add their tensors."""
    x = torch.randn(2, 3, 16, 16) * 5
    u = init_model(tiny(pixel_norm=True), 3, 1)
    assert torch.allclose(u.encode(x).square().flatten(1).mean(1), torch.ones(2), atol=1e-3)
    d = init_model(tiny(half_res=True), 3, 1)
    assert max(int(k) for k in d.decoder_a.blocks) == 8 and d.decoder_a.outputs["16"].conv.out_channels == 12
    plain = init_model(tiny(), 3, 1)
    assert max(int(k) for k in plain.decoder_a.blocks) == 16
    rs = init_model(tiny(decoder_res_blocks=2, upsample="pixel_shuffle"), 3, 1)
    assert "decoder_a.blocks.16.res.1.conv2.weight" in dict(rs.named_parameters())
    assert rs.decoder_a.blocks["16"].conv1.out_channels == 4 * plain.decoder_a.blocks["16"].conv1.out_channels
    with pytest.raises(ValueError, match="twice model.bottleneck_px"):
        init_model(tiny(half_res=True, resolution_px=8), 3, 1)  # 8 px latent: the decoder would end at the 4 px bottleneck
