"""Training throughput: images/s of the real training step vs. the bare model forward + backward.

For each codec (taef2, pixels) and resolution (128, 256, 512 px) it builds the params.yaml model grown to
that size, a latent cache of random latents of the right shape (what the step reads does not change its
cost), and times

  train   StageTrainer.step(): batch gather + normalise, flip, random warp, forward, losses, backward,
          grad-norm guard, fused Adam, EMA / LRD when configured, counters: the loop's real step;
  bare    model forward + MSE + backward on tensors already in memory, same batch, nothing else;
  +adam   bare plus a plain torch Adam step over the same parameters: the hand-written loop a user would
          time (the anchor's "bare forward + backward + Adam step");

in the same process, one after the other. ``ratio = train / bare``: the share of the bare model's speed
the trainer keeps; 1 - ratio is what data handling, warp, the optimizer and bookkeeping cost.
``ratio+adam = train / +adam``: the same against the hand-written step, i.e. without the optimizer.

    python benchmarks/train_throughput.py [--codecs taef2 pixels] [--resolutions 128 256 512] [--seconds 10]
    python benchmarks/train_throughput.py --profile liae-256      # profiles/liae-256.yaml merged over params.yaml

Settings come from params.yaml (model, codec, train.defaults), or from params.yaml with a profile merged
over it (``--profile``: as ``make profile`` would, in a temp copy; then the codec is params.yaml's and the
resolutions are the profile's recipe's); images count both domains, as in training.
On a shared machine the absolute figures are noisy; the ratio, measured back to back, less so.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stagewise.codecs import CodecConfig, load_codec  # noqa: E402
from stagewise.config import load_section, read_params  # noqa: E402
from stagewise.latents import ShardWriter, to_bytes  # noqa: E402
from stagewise.models import DOMAINS, ModelConfig, init_model  # noqa: E402
from stagewise.profiles import PROFILES_DIR, apply_profile  # noqa: E402
from stagewise.train import checkpoint as ckpt  # noqa: E402
from stagewise.train.loop import StageJob, StageTrainer  # noqa: E402
from stagewise.train.recipe import parse_train  # noqa: E402

IMAGES_PER_DOMAIN = 16  # enough distinct rows that the gather is real; the cost does not depend on it


def fake_cache(folder: Path, codec_id: str, shape: tuple[int, int, int], resolution_px: int) -> None:
    writer = ShardWriter(folder)
    gen = torch.Generator().manual_seed(0)
    for domain in DOMAINS:
        for i in range(IMAGES_PER_DOMAIN):
            latent = torch.randn(shape, generator=gen)
            sha = hashlib.sha256(f"{domain}{i}".encode()).hexdigest()
            for flipped in (False, True):  # the cache's mirrored rows (a TAEF2 latent is never mirrored in the loop)
                x = latent.flip(-1) if flipped else latent
                writer.add(sha256=sha, domain=domain, resolution=resolution_px, codec_id=codec_id, shape=list(shape), latent=to_bytes(x), flipped=flipped, caption="", fingerprint="bench")
    writer.flush()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def race(fns: dict, seconds: float, rounds: int = 3) -> dict[str, float]:
    """Best seconds per call of each function, measured in alternating rounds of about ``seconds / rounds``.

    Alternating and keeping the best round makes the comparison fair on a shared machine: a burst of
    someone else's load slows one round, not one contender."""
    for fn in fns.values():  # warm-up (allocations, oneDNN kernel choice)
        fn(), fn()
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync()
            calls, start = 0, time.perf_counter()
            while calls < 2 or time.perf_counter() - start < seconds / rounds:
                fn()
                calls += 1
            _sync()
            best[name] = min(best[name], (time.perf_counter() - start) / calls)
    return best


def bench(codec_cfg: CodecConfig, model_cfg: ModelConfig, defaults: dict, resolution_px: int, seconds: float, work: Path) -> dict:
    codec = load_codec(codec_cfg)
    runs = work / codec_cfg.name
    init = init_model(model_cfg, codec.channels, codec.factor)
    ckpt.save_model(runs / "init", init, {"stage": "init", "codec_id": codec.id, "config": {}})
    # Grow through the real stage machinery: each doubling is a (zero-length-ish) parent stage.
    parent, px = "init", model_cfg.resolution_px
    stages = {}
    while px <= resolution_px:
        name = f"s{px}"
        stages[name] = {"parent": parent, "resolution_px": px, "length_kimg": 0.001, "holdout_per_domain": 0}
        parent, px = name, px * 2
    train = parse_train({"defaults": defaults, "stages": stages})
    for name, stage in train.stages.items():
        cache = work / "cache" / codec_cfg.name / str(stage.resolution_px)
        if not cache.exists():
            latent_px = codec.latent_px(stage.resolution_px)
            fake_cache(cache, codec.id, (codec.channels, latent_px, latent_px), stage.resolution_px)
        job = StageJob(name, train, codec_cfg, runs / stage.parent, cache, runs / name, runs / name / "backups", progress=False)
        trainer = StageTrainer(job)
        if name != parent:  # a parent on the way: write its model so the next stage can grow from it
            trainer.run()
    batch = trainer.cfg.batch_size
    model = trainer.model
    x = torch.cat([trainer.data.batch(d, 0, batch) for d in DOMAINS])

    def bare() -> None:
        model.zero_grad(set_to_none=True)
        h = model.encode(x)
        pred = torch.cat([model.decode(part, d) for part, d in zip(h.chunk(2), DOMAINS)])
        (pred - x).square().mean().backward()

    adam = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-9)  # a tiny LR: the weights barely move

    def bare_adam() -> None:
        bare()
        adam.step()

    seconds_per = race({"train": trainer.step, "bare": bare, "bare_adam": bare_adam}, seconds)
    images = 2 * batch * trainer.cfg.grad_accum
    return {**{k: images / v for k, v in seconds_per.items()}, "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--profile", help="a profile name in profiles/ (or a path): its model, batch size and resolutions")
    parser.add_argument("--codecs", nargs="+", help="default: taef2 pixels, or params.yaml's codec with --profile")
    parser.add_argument("--resolutions", nargs="+", type=int, help="default: 128 256 512, or the profile's recipe's")
    parser.add_argument("--seconds", type=float, default=12.0, help="time per contender and setting, split in 3 alternating rounds (default: %(default)s)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        if args.profile:
            merged = Path(tmp) / "params.yaml"
            shutil.copy(args.params, merged)
            apply_profile(args.profile, merged, ROOT / PROFILES_DIR)
            args.params = str(merged)
            print(f"profile {args.profile}: {ROOT / PROFILES_DIR / args.profile}.yaml over {ROOT / 'params.yaml'}")
        run(args)


def run(args: argparse.Namespace) -> None:
    if args.resolutions is None:
        stages = parse_train(read_params(args.params).get("train"), args.params).stages.values()
        args.resolutions = sorted({s.resolution_px for s in stages}) if args.profile else [128, 256, 512]
    if args.codecs is None:
        args.codecs = [load_section("codec", CodecConfig, args.params).name] if args.profile else ["taef2", "pixels"]
    model_cfg = load_section("model", ModelConfig, args.params)
    codec_base = load_section("codec", CodecConfig, args.params)
    defaults = {**(read_params(args.params).get("train", {}).get("defaults") or {}), "save_every_kimg": 1000, "log_every_kimg": 1000}
    print(f"device: {'cuda' if torch.cuda.is_available() else 'cpu'}, torch threads: {torch.get_num_threads()}, batch: {defaults.get('batch_size', 8)} per domain")
    print(f"{'codec':8} {'px':>5} {'latent':>7} {'params':>7} {'train img/s':>12} {'bare img/s':>11} {'ratio':>6} {'+adam img/s':>12} {'ratio+adam':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.codecs:
            codec_cfg = codec_base.model_copy(update={"name": name})
            try:
                load_codec(codec_cfg)
            except Exception as exc:  # e.g. TAEF2 weights not found offline
                print(f"{name:8} skipped: {exc}")
                continue
            for px in args.resolutions:
                r = bench(codec_cfg, model_cfg, defaults, px, args.seconds, Path(tmp))
                factor = 8 if name == "taef2" else 1
                print(f"{name:8} {px:>5} {px // factor:>5}px {r['params_m']:>6.2f}M {r['train']:>12.1f} {r['bare']:>11.1f} {r['train'] / r['bare']:>6.2f} {r['bare_adam']:>12.1f} {r['train'] / r['bare_adam']:>10.2f}", flush=True)


if __name__ == "__main__":
    main()
