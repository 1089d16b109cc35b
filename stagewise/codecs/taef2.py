"""TAEF2: the tiny autoencoder for the FLUX.2 latent space (32 channels, 8x smaller), MIT licence.

Built from the layer list in ``models/taef2/ARCHITECTURE.md``: two ``nn.Sequential`` stacks whose
indices are exactly the keys of the published state dicts, so the weights load with ``strict=True``.
The files are float16; we compute in float32, the precision ARCHITECTURE.md's quality figures were measured in.

Weights are looked up, in order, in: the ``codec.weights`` folder from params, ``$STAGEWISE_MODELS/taef2``,
``~/.cache/stagewise/taef2``, and finally downloaded from the public madebyollin/taesd repository into
that user cache and checked against the published sha256. ``STAGEWISE_OFFLINE=1`` skips the download;
``STAGEWISE_TAEF2_URL`` points it at a mirror.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import urllib.error
import urllib.request
from pathlib import Path

import torch
from torch import nn

from stagewise.cli import StageError
from stagewise.codecs.base import Codec, CodecConfig
from stagewise.io import atomic_path, sha256_file

log = logging.getLogger(__name__)

FILES = {"encoder": "taef2_encoder.pth", "decoder": "taef2_decoder.pth"}
# Published digests (ARCHITECTURE.md); a download that does not match is discarded.
SHA256 = {
    "encoder": "10a4e1021e89d7551eaf161352da8dbd0b1aa83872ae28b150c1df1ce2f147b6",
    "decoder": "0a44a31e1ae59eb9dbf9359d24942fd3ef5928162c1800d97a28c61d51be0ab5",
}
DOWNLOAD_BASE_URL = "https://github.com/madebyollin/taesd/raw/main/"
# A mirror for sites that cannot reach GitHub (a folder URL ending in "/"); the sha256 check still applies.
BASE_URL_ENV = "STAGEWISE_TAEF2_URL"
# Offline, a DNS failure returns at once, but a black-holed route would hang: bound every socket wait.
DOWNLOAD_TIMEOUT_S = 10.0
WIDTH = 64  # channels of every hidden layer
LATENT_CHANNELS = 32


def _conv(c_in: int, c_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=1, **kwargs)


class Block(nn.Module):
    """Residual block: ReLU(conv-ReLU-conv-ReLU-conv(x) + x); a *mid* block first adds a 1x1 bottleneck branch."""

    def __init__(self, mid: bool = False):
        super().__init__()
        self.conv = nn.Sequential(_conv(WIDTH, WIDTH), nn.ReLU(), _conv(WIDTH, WIDTH), nn.ReLU(), _conv(WIDTH, WIDTH))
        self.pool = (
            nn.Sequential(
                nn.Conv2d(WIDTH, 4 * WIDTH, 1, bias=False),
                nn.GroupNorm(4, 4 * WIDTH),
                nn.ReLU(),
                nn.Conv2d(4 * WIDTH, WIDTH, 1, bias=False),
            )
            if mid
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return torch.relu(self.conv(x) + x)


class SoftClamp(nn.Module):
    """3 * tanh(x / 3): leaves typical latents (about +-5) nearly unchanged, tames outliers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 3 * torch.tanh(x / 3)


def build_encoder() -> nn.Sequential:
    def down() -> nn.Conv2d:
        return _conv(WIDTH, WIDTH, stride=2, bias=False)

    return nn.Sequential(
        _conv(3, WIDTH), Block(),                          # 0-1
        down(), Block(), Block(), Block(),                 # 2-5
        down(), Block(), Block(), Block(),                 # 6-9
        down(), Block(True), Block(True), Block(True),     # 10-13
        _conv(WIDTH, LATENT_CHANNELS),                     # 14
    )  # fmt: skip


def build_decoder() -> nn.Sequential:
    def up() -> list[nn.Module]:
        return [nn.Upsample(scale_factor=2, mode="nearest"), _conv(WIDTH, WIDTH, bias=False)]

    return nn.Sequential(
        SoftClamp(), _conv(LATENT_CHANNELS, WIDTH), nn.ReLU(),  # 0-2
        Block(True), Block(True), Block(True),                  # 3-5
        *up(), Block(), Block(), Block(),                       # 6-10
        *up(), Block(), Block(), Block(),                       # 11-15
        *up(), Block(),                                         # 16-18
        _conv(WIDTH, 3),                                        # 19
    )  # fmt: skip


class TAEF2(Codec):
    name = "taef2"
    channels = LATENT_CHANNELS
    factor = 8
    # Raw latent statistics (float32 encoder, 256 px centre crops): scikit-image's eight colour photos
    # mean +0.003, std 0.83 (per-channel means -0.23..+0.35, |max| 5.8); 12 DreamBooth photos mean +0.018,
    # std 0.85. So no shift, and a scale of 1.2 gives about unit spread, which the trainer's init assumes.
    default_shift = 0.0
    default_scale = 1.2

    def __init__(self, cfg: CodecConfig | None = None, weights_id: str = "untrained"):
        super().__init__(cfg or CodecConfig(name="taef2"))
        self.encoder = build_encoder()
        self.decoder = build_decoder()
        self._weights_id = weights_id
        self.to(memory_format=torch.channels_last)

    @property
    def id(self) -> str:
        return f"{self.name}-{self._weights_id}"

    def encode(self, rgb: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1], (N, 3, H, W) with H, W multiples of 8 -> raw latent (N, 32, H/8, W/8), float32."""
        with torch.inference_mode():
            return self.encoder(rgb.float().contiguous(memory_format=torch.channels_last))

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Raw latent -> RGB in [0, 1]. Runs in inference mode: previews and metrics, not a loss to backprop."""
        with torch.inference_mode():
            return self.decoder(latent.float().contiguous(memory_format=torch.channels_last)).clamp(0, 1)


# ---------------------------------------------------------------------------------------------
# Weights


def candidate_folders(cfg: CodecConfig) -> list[tuple[str, Path | None]]:
    """The places searched, in order, each with how it was chosen; None where that place is not set."""
    models = os.environ.get("STAGEWISE_MODELS")
    return [
        ("params codec.weights", Path(cfg.weights).expanduser() if cfg.weights else None),
        ("$STAGEWISE_MODELS/taef2", Path(models).expanduser() / "taef2" if models else None),
        ("user cache", user_cache()),
    ]


def user_cache() -> Path:
    return Path.home() / ".cache" / "stagewise" / "taef2"


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in FILES.values())


def download(dest: Path, base_url: str = DOWNLOAD_BASE_URL, timeout_s: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Fetch both files into ``dest``; each lands under its final name only once its sha256 matches."""
    for part, name in FILES.items():
        if (dest / name).is_file() and sha256_file(dest / name) == SHA256[part]:
            continue
        url = base_url + name
        log.info("downloading %s", url)
        digest = hashlib.sha256()
        with atomic_path(dest / name) as tmp:
            with urllib.request.urlopen(url, timeout=timeout_s) as response, open(tmp, "wb") as f:
                while block := response.read(1 << 20):
                    digest.update(block)
                    f.write(block)
            if digest.hexdigest() != SHA256[part]:
                raise ValueError(f"{url}: sha256 {digest.hexdigest()} does not match the published {SHA256[part]}")


def find_weights(cfg: CodecConfig) -> Path:
    """The folder holding both weight files; downloads into the user cache as a last resort."""
    looked = []
    for how, folder in candidate_folders(cfg):
        if folder is None:
            looked.append(f"  {how}: not set")
            continue
        if _complete(folder):
            return folder
        missing = [n for n in FILES.values() if not (folder / n).is_file()]
        looked.append(f"  {how}: {folder} (missing {', '.join(missing)})")
        if how.startswith("params"):
            log.warning("codec.weights %s lacks %s; searching the default places", folder, ", ".join(missing))
    if os.environ.get("STAGEWISE_OFFLINE"):
        looked.append("  download: skipped (STAGEWISE_OFFLINE is set)")
    else:
        base_url = os.environ.get(BASE_URL_ENV) or DOWNLOAD_BASE_URL
        try:
            download(user_cache(), base_url)
            return user_cache()
        except (urllib.error.URLError, OSError, ValueError) as exc:  # offline, timed out, HTTP error, bad digest
            reason = getattr(exc, "reason", None) or exc
            looked.append(f"  download: {base_url}{{{','.join(FILES.values())}}} failed: {reason}")
    raise StageError(
        "TAEF2 weights (taef2_encoder.pth, taef2_decoder.pth) not found. Looked in:\n"
        + "\n".join(looked)
        + "\nPut both files in one of those folders (or set codec.weights in params.yaml to their folder), "
        "or run without weights using the identity codec: set `codec: {name: pixels}` in params.yaml "
        "(or `dvc exp run -S codec.name=pixels`)."
    )


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    # Third-party weights: weights_only refuses anything but tensors and plain containers (no pickled code).
    state = torch.load(path, weights_only=True, map_location="cpu")
    return {k: v.float() for k, v in state.items()}


def load_taef2(cfg: CodecConfig) -> TAEF2:
    folder = find_weights(cfg)
    digests = {part: sha256_file(folder / name) for part, name in FILES.items()}
    for part, digest in digests.items():
        if digest != SHA256[part]:  # allowed (e.g. a fine-tune), and the codec id tells them apart
            log.warning("%s: sha256 %s differs from the published TAEF2 weights", folder / FILES[part], digest[:12])
    weights_id = hashlib.sha256((digests["encoder"] + digests["decoder"]).encode()).hexdigest()[:8]
    codec = TAEF2(cfg, weights_id=weights_id)
    try:
        codec.encoder.load_state_dict(_load_state(folder / FILES["encoder"]), strict=True)
        codec.decoder.load_state_dict(_load_state(folder / FILES["decoder"]), strict=True)
    except (RuntimeError, OSError, EOFError, AttributeError, pickle.UnpicklingError) as exc:  # not a state dict of these keys
        raise StageError(f"{folder}: TAEF2 weight files do not load: {exc}") from None
    log.info("codec %s from %s", codec.id, folder)
    return codec
