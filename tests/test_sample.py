import hashlib
import json

from PIL import Image

from stagewise.sample import SampleConfig, build_sample


def digest_tree(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_sample_has_both_domains_and_every_defect(sample_dir):
    defects = json.loads((sample_dir / "defects.json").read_text())
    assert {k: len(v) for k, v in defects.items()} == {"watermark": 3, "truncated": 1, "empty": 1, "not_image": 1, "duplicate": 1, "too_small": 1}
    for domain in ("a", "b"):
        crops = sorted((sample_dir / domain).glob(f"{domain}_0[0-9][0-9].jpg"))
        assert len(crops) == SampleConfig().crops_per_domain
        assert Image.open(crops[0]).size == (512, 512)
    # the crops vary (scale, offset, rotation, colour): no two are identical
    a_hashes = {hashlib.sha256(p.read_bytes()).digest() for p in (sample_dir / "a").glob("a_0??.jpg")}
    assert len(a_hashes) == SampleConfig().crops_per_domain


def test_sample_is_deterministic_for_a_seed(tmp_path, sample_dir):
    small = SampleConfig(crops_per_domain=6)
    build_sample(tmp_path / "one", small)
    build_sample(tmp_path / "two", small)
    assert digest_tree(tmp_path / "one") == digest_tree(tmp_path / "two")
    build_sample(tmp_path / "three", small.model_copy(update={"seed": 1}))
    assert digest_tree(tmp_path / "one") != digest_tree(tmp_path / "three")
