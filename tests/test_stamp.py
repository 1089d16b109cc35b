"""The evaluation stamps: each kind and placement draws what it says where it says, at the opacity asked,
with fonts from installed packages only, deterministically for a seed."""

import numpy as np
import pytest
import skimage.data
from PIL import Image

from stagewise.curation.stamp import (
    KINDS, LOGO_SHAPES, OPACITY_BUCKETS, PLACEMENTS, SIZE_RANGE, Stamp, available_fonts, opacity_bucket, random_stamp, stamp,
)

SIZE = (480, 320)


@pytest.fixture(scope="module")
def photo():
    return Image.fromarray(skimage.data.coffee()).resize(SIZE, Image.LANCZOS)


def changed(before, after, level=3):
    """Pixels the stamp changed by more than ``level`` grey levels."""
    diff = np.abs(np.asarray(after, dtype=np.int16) - np.asarray(before, dtype=np.int16)).max(axis=2)
    return diff > level


def quadrant_shares(mask):
    h, w = mask.shape
    quads = {"top-left": mask[: h // 2, : w // 2], "top-right": mask[: h // 2, w // 2:], "bottom-left": mask[h // 2:, : w // 2], "bottom-right": mask[h // 2:, w // 2:]}
    total = max(mask.sum(), 1)
    return {k: v.sum() / total for k, v in quads.items()}


def test_fonts_come_from_installed_packages():
    fonts = available_fonts()
    assert fonts["pillow-default"] is None  # Pillow's built-in scalable font
    ttfs = {name: path for name, path in fonts.items() if path is not None}
    assert len(ttfs) >= 3 and all(p.is_file() and "matplotlib" in str(p) for p in ttfs.values())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_each_kind_and_placement_draws_where_it_says(photo, kind, placement):
    rng = np.random.default_rng(10 * KINDS.index(kind) + PLACEMENTS.index(placement))
    spec = random_stamp(rng, kind, placement, opacity=0.5)
    assert (spec.kind, spec.placement, spec.opacity) == (kind, placement, 0.5)
    low, high = SIZE_RANGE[(kind, placement)]
    assert low <= spec.size_frac <= high
    assert (spec.text != "") == (kind == "text") and (spec.shape in LOGO_SHAPES) == (kind == "logo")
    mask = changed(photo, stamp(photo, spec))
    assert mask.mean() > 0.002, "nothing visible was drawn"
    shares = quadrant_shares(mask)
    if placement == "corner":
        assert shares[spec.corner] > 0.95, (spec.corner, shares)
    elif placement == "centre":
        h, w = mask.shape
        ys, xs = np.nonzero(mask)
        assert abs(xs.mean() - w / 2) < 0.1 * w and abs(ys.mean() - h / 2) < 0.1 * h
        assert not mask[: h // 10].any() and not mask[-h // 10:].any()  # a centre stamp leaves the edges alone
    else:  # tiled: all over the image
        assert min(shares.values()) > 0.1, shares


def test_opacity_scales_the_change(photo):
    base = dict(kind="text", placement="centre", size_frac=0.12, colour="white", outline=False, font="DejaVuSans-Bold", text="SAMPLE")
    deltas = []
    for opacity in (0.1, 0.3, 0.6):
        after = stamp(photo, Stamp(opacity=opacity, **base))
        mask = changed(photo, after)
        deltas.append(np.abs(np.asarray(after, float) - np.asarray(photo, float))[mask].mean())
    assert deltas[0] < deltas[1] < deltas[2]
    # Same glyphs whatever the opacity: the changed area barely moves (only anti-aliased edges cross the level).
    assert changed(photo, stamp(photo, Stamp(opacity=0.6, **base))).sum() < 1.5 * changed(photo, stamp(photo, Stamp(opacity=0.3, **base))).sum()


def test_fonts_and_shapes_draw_differently(photo):
    text = dict(kind="text", placement="centre", opacity=0.6, size_frac=0.12, colour="black", outline=False, text="getty images")
    by_font = {name: np.asarray(stamp(photo, Stamp(font=name, **text))) for name in available_fonts()}
    names = list(by_font)
    assert all(not np.array_equal(by_font[a], by_font[b]) for i, a in enumerate(names) for b in names[i + 1:])
    logo = dict(kind="logo", placement="centre", opacity=0.6, size_frac=0.35, colour="white", outline=True)
    by_shape = {s: changed(photo, stamp(photo, Stamp(shape=s, **logo))) for s in LOGO_SHAPES}
    assert all((by_shape[a] != by_shape[b]).mean() > 0.005 for i, a in enumerate(LOGO_SHAPES) for b in LOGO_SHAPES[i + 1:])


def test_long_text_is_shrunk_to_fit(photo):
    spec = Stamp(kind="text", placement="centre", opacity=0.6, size_frac=0.18, colour="white", outline=True, font="DejaVuSans", text="© Jane Doe Photography")
    mask = changed(photo, stamp(photo, spec))
    cols = np.nonzero(mask.any(axis=0))[0]
    assert cols.min() > 0 and cols.max() < SIZE[0] - 1  # whole text inside the image


def test_deterministic_for_a_seed_and_checked(photo):
    a = [random_stamp(np.random.default_rng(7), k, p) for k in KINDS for p in PLACEMENTS]
    b = [random_stamp(np.random.default_rng(7), k, p) for k in KINDS for p in PLACEMENTS]
    assert a == b and all(0.05 <= s.opacity <= 0.6 for s in a)
    assert np.array_equal(np.asarray(stamp(photo, a[2])), np.asarray(stamp(photo, b[2])))
    with pytest.raises(ValueError, match="unknown stamp kind/placement 'qr'"):
        random_stamp(np.random.default_rng(0), "qr", "corner")


def test_opacity_buckets():
    assert [opacity_bucket(o) for o in (0.05, 0.099, 0.1, 0.25, 0.4, 0.6)] == ["5-10%", "5-10%", "10-20%", "20-40%", "40-60%", "40-60%"]
    assert len(OPACITY_BUCKETS) == 4
