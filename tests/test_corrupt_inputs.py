"""Malformed and unusual files mixed into good ones: every file kept or rejected with a reason, no crash."""

import os

from harness.faults import expected_for, make_corpus, make_good
from stagewise.curation.ingest import IngestConfig, ingest


def test_every_corrupt_kind_is_classified_and_good_images_kept(tmp_path):
    folder = tmp_path / "in"
    corpus = make_corpus(folder, seed=3, per_kind=2)
    good = make_good(folder, 10)
    manifest, _ = ingest({"a": folder}, IngestConfig(), tmp_path / "store")

    assert len(manifest) == sum(map(len, corpus.values())) + len(good)
    assert manifest["status"].isin(["kept", "rejected"]).all()
    rejected = manifest[manifest.status == "rejected"]
    assert (rejected["reason"].str.len() > 0).all()
    status = dict(zip(manifest["path"], manifest["status"]))
    assert all(status[str(p)] == "kept" for p in good)
    for kind, paths in corpus.items():
        want = expected_for(kind)
        for path in paths:
            key = str(path) if kind != "non_utf8_name" else os.fsencode(path).decode("utf-8", "backslashreplace")
            assert key in status, f"{kind}: {path} missing from the manifest"
            if want != "either":
                assert status[key] == want, f"{kind}: {path} was {status[key]}, expected {want}"
    reasons = dict(zip(manifest["path"], manifest["reason"]))
    assert reasons[str(corpus["symlink_loop"][0])] == "unreadable: symlink loop"
    assert reasons[str(corpus["bomb_header"][0])].startswith("too large: 40000x40000")
    assert reasons[str(corpus["one_pixel"][0])].startswith("too small: 1x1")



def test_corrupt_corpus_through_every_curation_stage_and_the_cache():
    """The benchmark at its smallest: every curation stage and the cache as real processes on the corpus
    mixed with good photos; it exits 1 on a crash, a wrong decision, a cache duplicate or a touched input."""
    import subprocess
    import sys

    from conftest import ROOT

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fault_corrupt.py"), "--per-kind", "1", "--good", "4"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "crashes 0  wrong decisions 0  input entries changed 0" in proc.stdout
