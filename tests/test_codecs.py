"""Codecs: the identity codec is exact; our TAEF2 module loads the published weights strictly, reproduces
the measured round-trip quality, and its weight lookup fails (or downloads) cleanly."""

import functools
import hashlib
import http.server
import shutil
import socket
import threading

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from conftest import taef2_dir
from stagewise.cli import StageError
from stagewise.codecs import CodecConfig, load_codec
from stagewise.codecs import taef2 as taef2_module
from stagewise.images import center_square
from stagewise.latents import from_rows, to_bytes

needs_weights = pytest.mark.skipif(taef2_dir() is None, reason="TAEF2 weights not found: set STAGEWISE_MODELS to the folder holding taef2/")


def to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255


def to_uint8(rgb: torch.Tensor) -> np.ndarray:
    return (rgb[0].permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)


def test_pixels_round_trip_through_float16_storage_is_exact():
    codec = load_codec(CodecConfig(name="pixels"))
    pixels = np.random.default_rng(0).integers(0, 256, (2, 3, 24, 16), dtype=np.uint8)
    raw = codec.encode(torch.from_numpy(pixels).float() / 255)
    import pandas as pd

    rows = pd.DataFrame({"shape": [list(raw.shape[1:])] * 2, "latent": [to_bytes(raw[0]), to_bytes(raw[1])]})
    stored = from_rows(rows)  # what the trainer gets back from a shard
    back = (codec.decode(stored.float()) * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(back, pixels)
    assert torch.allclose(codec.denormalize(codec.normalize(raw)), raw)
    assert (codec.id, codec.channels, codec.latent_px(512)) == ("pixels", 3, 512)


@pytest.fixture(scope="module")
def taef2():
    return load_codec(CodecConfig(name="taef2", weights=str(taef2_dir())))


@needs_weights
def test_taef2_loads_strict_with_weight_hash_id(taef2):
    files = {part: taef2_dir() / f"taef2_{part}.pth" for part in ("encoder", "decoder")}
    for part, path in files.items():
        published = torch.load(path, weights_only=True, map_location="cpu")
        module = getattr(taef2, part)
        assert set(module.state_dict()) == set(published)  # the same check strict=True made on load
        assert all(module.state_dict()[k].dtype == torch.float32 for k in published)
        assert torch.equal(module.state_dict()["1.conv.0.weight" if part == "encoder" else "19.weight"],
                           published["1.conv.0.weight" if part == "encoder" else "19.weight"].float())  # fmt: skip
    digests = [hashlib.sha256(files[p].read_bytes()).hexdigest() for p in ("encoder", "decoder")]
    assert taef2.id == "taef2-" + hashlib.sha256("".join(digests).encode()).hexdigest()[:8]
    assert sum(p.numel() for p in taef2.encoder.parameters()) == 1_338_528


# The measurement setup of ARCHITECTURE.md: skimage's eight colour photos, centre crop, LANCZOS, 8-bit output.
PHOTOS = {
    **{name: functools.partial(getattr(skimage.data, name)) for name in
       ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina")},
    "motorcycle": lambda: skimage.data.stereo_motorcycle()[0],
}  # fmt: skip


@needs_weights
def test_taef2_reproduces_measured_round_trip_quality_at_256px(taef2):
    crops = {name: np.asarray(center_square(Image.fromarray(load()).convert("RGB"), 256)) for name, load in PHOTOS.items()}
    batch = torch.from_numpy(np.stack(list(crops.values()))).permute(0, 3, 1, 2).float() / 255
    latents = taef2.encode(batch)  # one batch: the same numbers as one at a time, in a third of the time
    assert latents.shape == (8, 32, 32, 32)
    decoded = taef2.decode(latents)
    psnr, ssim = {}, {}
    for i, (name, ref) in enumerate(crops.items()):
        out = to_uint8(decoded[i : i + 1])
        psnr[name] = peak_signal_noise_ratio(ref, out, data_range=255)
        ssim[name] = structural_similarity(ref, out, data_range=255, channel_axis=2)
    assert psnr["astronaut"] >= 28.0, psnr
    # ARCHITECTURE.md measured 30.3 dB / 0.907 over these eight; a correct module lands within a few tenths.
    assert np.mean(list(psnr.values())) >= 30.0, psnr
    assert np.mean(list(ssim.values())) >= 0.895, ssim


@needs_weights
def test_taef2_default_normalisation_gives_about_unit_spread(taef2):
    img = center_square(Image.fromarray(skimage.data.chelsea()), 128)
    normalized = taef2.normalize(taef2.encode(to_tensor(img)))
    assert abs(normalized.mean().item()) < 0.3 and 0.6 < normalized.std().item() < 1.5


@pytest.fixture
def no_weights_anywhere(tmp_path, monkeypatch):
    """An empty STAGEWISE_MODELS and HOME, and a download URL where nothing listens."""
    (tmp_path / "models").mkdir()
    monkeypatch.setenv("STAGEWISE_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("STAGEWISE_OFFLINE", raising=False)
    with socket.socket() as s:  # a port that was free a moment ago: connecting is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("STAGEWISE_TAEF2_URL", f"http://127.0.0.1:{port}/")
    return tmp_path


def test_missing_weights_error_names_every_place_and_the_pixels_way_out(no_weights_anywhere):
    tmp = no_weights_anywhere
    with pytest.raises(StageError) as err:
        load_codec(CodecConfig(name="taef2", weights=str(tmp / "mine")))
    message = str(err.value)
    assert f"params codec.weights: {tmp / 'mine'} (missing taef2_encoder.pth, taef2_decoder.pth)" in message
    assert f"$STAGEWISE_MODELS/taef2: {tmp / 'models' / 'taef2'}" in message
    assert f"user cache: {tmp / 'home' / '.cache' / 'stagewise' / 'taef2'}" in message
    assert "download: http://127.0.0.1:" in message and "failed" in message
    assert "codec: {name: pixels}" in message


def test_offline_switch_skips_the_download(no_weights_anywhere, monkeypatch):
    monkeypatch.setenv("STAGEWISE_OFFLINE", "1")
    with pytest.raises(StageError, match=r"download: skipped \(STAGEWISE_OFFLINE is set\)"):
        load_codec(CodecConfig(name="taef2"))


@pytest.fixture
def http_folder(tmp_path):
    """A real HTTP server on 127.0.0.1 serving a folder (stands in for the GitHub raw URL)."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@needs_weights
def test_download_lands_in_user_cache_after_sha256_check(no_weights_anywhere, http_folder, monkeypatch):
    served, url = http_folder
    for name in taef2_module.FILES.values():
        shutil.copy(taef2_dir() / name, served / name)
    monkeypatch.setenv("STAGEWISE_TAEF2_URL", url)
    codec = load_codec(CodecConfig(name="taef2"))
    cache = no_weights_anywhere / "home" / ".cache" / "stagewise" / "taef2"
    assert sorted(p.name for p in cache.iterdir()) == sorted(taef2_module.FILES.values())
    assert codec.id == load_codec(CodecConfig(name="taef2", weights=str(taef2_dir()))).id


def test_download_with_wrong_bytes_is_refused_and_not_kept(no_weights_anywhere, http_folder, monkeypatch):
    served, url = http_folder
    for name in taef2_module.FILES.values():
        (served / name).write_bytes(b"not the published weights")
    monkeypatch.setenv("STAGEWISE_TAEF2_URL", url)
    with pytest.raises(StageError, match="does not match the published"):
        load_codec(CodecConfig(name="taef2"))
    cache = no_weights_anywhere / "home" / ".cache" / "stagewise" / "taef2"
    assert not cache.exists() or not any(cache.iterdir())


def test_garbage_weight_files_are_a_clear_error(tmp_path):
    for name in taef2_module.FILES.values():
        (tmp_path / name).write_bytes(b"not a state dict")
    with pytest.raises(StageError, match=f"{tmp_path}: TAEF2 weight files do not load"):
        load_codec(CodecConfig(name="taef2", weights=str(tmp_path)))
