"""Model resolution: local folders, hub ids from the offline cache, and fast, clear failures."""

import shutil
import sys
import time

import pytest
import torch

from conftest import ROOT, run
from stagewise.cli import StageError
from stagewise.hub import identity, load_pretrained, looks_like_path, offline, resolve, torch_dtype
from tiny_models import tiny_blip

MISSING = "nobody-here/no-such-vlm"


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    return tiny_blip(tmp_path_factory.mktemp("models") / "blip-vqa")


def test_unknown_id_offline_fails_fast_with_how_to(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(StageError) as err:
        resolve(MISSING, section="vlm_filter")
    elapsed = time.perf_counter() - start
    message = str(err.value)
    assert message.startswith(f"vlm_filter.model: cannot load model '{MISSING}': this machine is offline (HF_HUB_OFFLINE=1)")
    assert "save_pretrained" in message and "`vlm_filter.model: /path/to/folder`" in message
    assert elapsed < 5, f"took {elapsed:.1f} s: from_pretrained's retries are what resolve() exists to avoid"


def test_stage_with_unknown_id_exits_2_with_the_message(tmp_path):
    (tmp_path / "params.yaml").write_text(f"vlm_filter:\n  model: {MISSING}\n")
    import pandas as pd

    pd.DataFrame({"path": ["x.png"], "domain": ["a"], "sha256": ["0" * 64], "status": ["kept"]}).to_parquet(tmp_path / "manifest.parquet")
    args = ["--manifest", "manifest.parquet", "--out", "out.parquet", "--store", "store"]
    proc = run([sys.executable, "-m", "stages.vlm_filter", *args], tmp_path, check=False, env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr
    assert f"error: vlm_filter.model: cannot load model '{MISSING}': this machine is offline" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out.parquet").exists()


def test_offline_is_read_at_call_time(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert offline()


def test_paths_and_ids_are_told_apart(tmp_path):
    assert not looks_like_path("Salesforce/blip-vqa-base") and not looks_like_path("gpt2")
    assert looks_like_path("./models/blip") and looks_like_path("/srv/models/blip") and looks_like_path("models/blip/v2")
    with pytest.raises(StageError, match=r"caption\.model: no folder at ./not/there/blip"):
        resolve("./not/there/blip", section="caption")
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    with pytest.raises(StageError, match="is a file; expected a model folder"):
        resolve(str(tmp_path / "weights.safetensors"), section="caption")


def test_cached_hub_copy_is_used_offline(blip_dir, tmp_path, monkeypatch):
    """A hub id whose snapshot is in the Hugging Face cache resolves to it with no network at all."""
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny--blip-vqa"
    shutil.copytree(blip_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = resolve("tiny/blip-vqa", section="vlm_filter")
    assert folder == repo / "snapshots" / commit
    assert identity(folder) == identity(blip_dir)  # same content, same memo key, wherever it lives
    from transformers import BlipForQuestionAnswering

    assert isinstance(load_pretrained(BlipForQuestionAnswering, folder, section="vlm_filter"), BlipForQuestionAnswering)


def test_identity_follows_content_not_location(blip_dir, tmp_path):
    copy = shutil.copytree(blip_dir, tmp_path / "moved")
    assert identity(copy) == identity(blip_dir)
    (copy / "README.md").write_text("notes do not change the model")
    assert identity(copy) == identity(blip_dir)
    config = (copy / "config.json").read_text()
    (copy / "config.json").write_text(config.replace('"projection_dim": 32', '"projection_dim": 33'))
    assert identity(copy) != identity(blip_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(StageError, match="no model files"):
        identity(tmp_path / "empty")


def test_unloadable_folder_names_itself(tmp_path):
    from transformers import BlipForQuestionAnswering

    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "tokenizer.json").write_text("{}")
    with pytest.raises(StageError, match=r"vlm_filter\.model: .*half cannot be loaded as BlipForQuestionAnswering"):
        load_pretrained(BlipForQuestionAnswering, tmp_path / "half", section="vlm_filter")


def test_auto_dtype_on_cpu_is_float32():
    assert torch_dtype("auto", torch.device("cpu")) is torch.float32
    assert torch_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16
