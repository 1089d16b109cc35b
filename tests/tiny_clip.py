"""A tiny random CLIP written as a real open_clip checkpoint: a custom architecture JSON (registered by
stagewise through ``open_clip.add_model_config``) plus a safetensors state dict, loaded back through
``open_clip.create_model_and_transforms(name, pretrained=<file>)`` exactly as a downloaded model is."""

from __future__ import annotations

import json
from pathlib import Path

NAME = "tiny-clip"
# 32 px images, one transformer layer per tower, 32-d embeddings: ~1.6 M parameters (mostly the token
# table, which must match open_clip's 49 408-token BPE vocabulary), ~6 MB, built in about a second.
ARCHITECTURE = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def tiny_clip(folder: Path, seed: int = 0) -> dict:
    """Write the architecture and random weights into ``folder``; return ClipConfig fields loading them."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = folder / f"{NAME}.json"
    config.write_text(json.dumps(ARCHITECTURE))
    weights = folder / f"{NAME}.safetensors"
    if not weights.exists():
        open_clip.add_model_config(config)
        torch.manual_seed(seed)
        model = open_clip.create_model(NAME)  # random init from the config, nothing downloaded
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return {"model": NAME, "pretrained": str(weights), "config_file": str(config), "batch_size": 4, "workers": 1, "device": "cpu"}
