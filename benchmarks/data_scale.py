"""Data at scale: does training memory stay flat, and speed stay up, as the latent cache grows?

For each size it writes a synthetic TAEF2-shaped 512 px cache (32 x 64 x 64 float16 = 256 KiB a row, the
cache stage's shard layout, half the rows per domain, each image with its flipped row), then, in a fresh
child process per size (so each peak is that size's alone):

  start     seconds to open the cache for training (StageData: the row index, held-out and preview rows);
  stream    StageTrainer.step() reading that cache from disk (prefetch threads, bounded row-group
            cache) for ``--seconds``: images/s, peak host RSS (ru_maxrss) and peak device memory;
  memory    the same step, in the same process, with every training row of the 1 000-row cache
            held on the device (what training did before streaming): the baseline;

then ``stream`` and ``memory`` again in alternating rounds (best round each) for ``ratio`` =
stream / memory images/s, and ``data ms/step``: the time to get one step's batches with no compute to
overlap (streamed, and in memory), against ``step ms``, the in-memory step. Targets: peak RSS grows by less than 1 GiB from 1 000 to 50 000 rows, and the
ratio at 50 000 rows is at least 0.9.

    python benchmarks/data_scale.py [--rows 1000 10000 50000] [--folder /tmp/stagewise-data-scale]
                                    [--seconds 12] [--model params|tiny] [--keep]

50 000 rows is about 12.5 GiB on disk; a size that does not fit on the folder's disk (with 2 GiB to
spare) is skipped with a message. Caches are reused when the folder already holds them, and removed at
the end unless ``--keep``. ``--model params`` is params.yaml's model built at 512 px; ``tiny`` a much
smaller one, whose faster step makes the data path the larger share of the time (the harder test).
The page cache is the kernel's: a cache that fits in free RAM is read from memory after it is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_throughput import race  # noqa: E402

from stagewise.codecs import CodecConfig, load_codec  # noqa: E402
from stagewise.config import load_section, read_params  # noqa: E402
from stagewise.latents import ShardWriter  # noqa: E402
from stagewise.models import DOMAINS, ModelConfig, init_model  # noqa: E402
from stagewise.train import checkpoint as ckpt  # noqa: E402
from stagewise.train.data import StageData  # noqa: E402
from stagewise.train.loop import StageJob, StageTrainer  # noqa: E402
from stagewise.train.recipe import parse_train  # noqa: E402

RESOLUTION_PX = 512
SHAPE = (32, 64, 64)  # taef2 at 512 px
ROW_BYTES = 2 * int(np.prod(SHAPE))
BASELINE_ROWS = 1000
TINY = dict(channel_base=256, channel_max=16, channel_min=8, ae_dims=64)
MARKER = "rows.json"


def write_cache(folder: Path, rows: int, codec_id: str) -> None:
    """``rows`` synthetic rows: a few random latents, each row made distinct by its first bytes."""
    if (folder / MARKER).exists() and json.loads((folder / MARKER).read_text()) == {"rows": rows, "codec_id": codec_id}:
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    pool = [np.random.default_rng(i).standard_normal(int(np.prod(SHAPE)), dtype=np.float32).astype("<f2") for i in range(16)]
    writer = ShardWriter(folder)  # the cache stage's defaults: 64 MiB shards, 1 MiB row groups
    images = rows // 2
    with tqdm(total=rows, desc=f"write {rows} rows", unit="row", mininterval=2.0) as bar:
        for i in range(images):
            domain = DOMAINS[i % 2]
            sha = f"{i:064x}"
            for flipped in (False, True):
                latent = pool[(2 * i + flipped) % len(pool)].copy()
                latent[:4] = [i % 1000, i // 1000 % 1000, i // 1000000, flipped]  # finite float16 values
                latent = latent.tobytes()
                writer.add(sha256=sha, domain=domain, resolution=RESOLUTION_PX, codec_id=codec_id, shape=list(SHAPE), latent=latent, flipped=flipped, caption="", fingerprint="bench")
                bar.update(1)
        writer.flush()
    (folder / MARKER).write_text(json.dumps({"rows": rows, "codec_id": codec_id}))


class InMemoryData:
    """The baseline: every training row on the device, a batch is an index_select (the pre-streaming code)."""

    def __init__(self, streamed: StageData):
        self.streamed = streamed
        self.rows = {d: streamed._read(*streamed._rows[d], pin=False).to(streamed.device) for d in DOMAINS}

    def batch(self, domain: str, position: int, count: int) -> torch.Tensor:
        index = self.streamed.indices(domain, position, count).to(self.streamed.device)
        return self.streamed.codec.normalize(self.rows[domain].index_select(0, index).float())

    def __getattr__(self, name: str):
        return getattr(self.streamed, name)


def trainer(work: Path, cache: Path, name: str, model_cfg: ModelConfig, defaults: dict, codec_cfg: CodecConfig) -> StageTrainer:
    codec = load_codec(codec_cfg)
    init = work / "runs" / "init"
    if not (init / ckpt.MODEL_FILE).exists():
        ckpt.save_model(init, init_model(model_cfg, codec.channels, codec.factor), {"stage": "init", "codec_id": codec.id, "config": {}})
    train = parse_train({"defaults": defaults, "stages": {name: {"parent": "init", "resolution_px": RESOLUTION_PX, "length_kimg": 1000}}})
    job = StageJob(name, train, codec_cfg, init, cache, work / "runs" / name, work / "runs" / name / "backups", progress=False)
    t = StageTrainer(job)
    return t


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def images_per_s(t: StageTrainer, seconds: float) -> float:
    t.step(), t.step()  # warm-up
    _sync()
    steps, start = 0, time.perf_counter()
    while steps < 3 or time.perf_counter() - start < seconds:
        t.step()
        steps += 1
    _sync()
    return steps * 2 * t.cfg.batch_size * t.cfg.grad_accum / (time.perf_counter() - start)


def data_ms(t: StageTrainer, steps: int = 30) -> float:
    """Milliseconds per step of getting both domains' batches with no compute in between, so the prefetch
    hides nothing: the data path's own cost, which the overlap hides when it is below a step's time."""
    batch = t.cfg.batch_size
    first = (t.state.step + 1000) * batch  # rows the training above has not touched: not in the row-group cache
    _sync()
    start = time.perf_counter()
    for step in range(steps):
        for d in DOMAINS:
            t.data.batch(d, first + step * batch, batch)
    _sync()
    return (time.perf_counter() - start) / steps * 1e3


def child(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING)
    model_cfg = load_section("model", ModelConfig, args.params).model_copy(update={"resolution_px": RESOLUTION_PX, **(TINY if args.model == "tiny" else {})})
    codec_cfg = load_section("codec", CodecConfig, args.params)
    defaults = {**(read_params(args.params).get("train", {}).get("defaults") or {}), "save_every_kimg": 1e6, "log_every_kimg": 1e6}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        stream = trainer(work, Path(args.cache), "stream", model_cfg, defaults, codec_cfg)
        start = time.perf_counter()  # what a start, resume or rollback pays for the data: the row index, a few rows
        cfg = stream.cfg
        StageData(Path(args.cache), stream.codec, RESOLUTION_PX, cfg.holdout_per_domain, cfg.flip, cfg.seed, stream.device).close()
        start_s = time.perf_counter() - start
        solo = images_per_s(stream, args.seconds)
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes (Linux reports KiB)
        peak_device = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        memory = trainer(work, Path(args.baseline_cache), "memory", model_cfg, defaults, codec_cfg)
        memory.data = InMemoryData(memory.data)
        best = race({"stream": stream.step, "memory": memory.step}, 2 * args.seconds)
        stream_ms, memory_ms = data_ms(stream), data_ms(memory)
        images = 2 * stream.cfg.batch_size * stream.cfg.grad_accum
        result = {
            "rows": args.rows[0],
            "start_s": start_s,
            "peak_rss": peak_rss,
            "peak_device": peak_device,
            "solo": solo,
            "stream": images / best["stream"],
            "memory": images / best["memory"],
            "stream_data_ms": stream_ms,
            "memory_data_ms": memory_ms,
            "step_ms": 1e3 * best["memory"],
            "device": str(stream.device),
            "params_m": sum(p.numel() for p in stream.model.parameters()) / 1e6,
        }
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", type=int, default=[1000, 10000, 50000], help="cache sizes in rows (default: %(default)s)")
    parser.add_argument("--folder", default="/tmp/stagewise-data-scale", help="where the synthetic caches are written (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=12.0, help="seconds of streamed training per size; the race takes twice that (default: %(default)s)")
    parser.add_argument("--model", choices=["params", "tiny"], default="params", help="params.yaml's model at 512 px, or a tiny one (default: %(default)s)")
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--keep", action="store_true", help="keep the caches for the next run")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--baseline-cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    codec = load_codec(load_section("codec", CodecConfig, args.params))
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    baseline = folder / f"rows-{BASELINE_ROWS}"
    write_cache(baseline, BASELINE_ROWS, codec.id)
    print(f"{'rows':>7} {'cache GiB':>9} {'start s':>7} {'peak RSS MiB':>12} {'peak dev MiB':>12} {'stream img/s':>12} {'memory img/s':>12} {'ratio':>6} {'data ms/step':>13} {'in-memory':>9} {'step ms':>8}", flush=True)
    results = []
    for rows in args.rows:
        cache = folder / f"rows-{rows}"
        need = rows * ROW_BYTES * 1.01
        have = sum(p.stat().st_size for p in cache.glob("*.parquet")) if cache.exists() else 0
        if shutil.disk_usage(folder).free + have < need + 2 * 2**30:
            print(f"{rows:>7} skipped: {need / 2**30:.1f} GiB do not fit in {folder} ({shutil.disk_usage(folder).free / 2**30:.1f} GiB free)", flush=True)
            continue
        write_cache(cache, rows, codec.id)
        cmd = [sys.executable, __file__, "--child", "--cache", str(cache), "--baseline-cache", str(baseline), "--rows", str(rows), "--seconds", str(args.seconds), "--model", args.model, "--params", args.params]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(f"{rows:>7} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
            continue
        r = json.loads(line[len("RESULT ") :])
        results.append(r)
        dev = f"{r['peak_device'] / 2**20:.0f}" if r["peak_device"] is not None else "-"
        gib = sum(p.stat().st_size for p in cache.glob("*.parquet")) / 2**30
        print(f"{rows:>7} {gib:>9.2f} {r['start_s']:>7.2f} {r['peak_rss'] / 2**20:>12.0f} {dev:>12} {r['stream']:>12.1f} {r['memory']:>12.1f} {r['stream'] / r['memory']:>6.2f} {r['stream_data_ms']:>13.2f} {r['memory_data_ms']:>9.2f} {r['step_ms']:>8.0f}", flush=True)
    if results:
        r0 = results[0]
        print(f"device: {r0['device']}, model: {args.model} ({r0['params_m']:.2f} M parameters), torch threads: {torch.get_num_threads()}; "
              f"baseline: every row of the {BASELINE_ROWS}-row cache on the device; solo stream img/s per size: "
              + ", ".join(f"{r['rows']}: {r['solo']:.1f}" for r in results))
        if len(results) > 1:
            print(f"peak RSS growth {results[0]['rows']} -> {results[-1]['rows']} rows: {(results[-1]['peak_rss'] - results[0]['peak_rss']) / 2**20:+.0f} MiB; "
                  f"an in-memory cache of {results[-1]['rows']} rows would hold {results[-1]['rows'] * ROW_BYTES / 2**30:.1f} GiB")
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
