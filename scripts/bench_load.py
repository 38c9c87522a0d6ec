"""Embedder load time: the old loader (random init, whole CLIP) against `load_embedder` (issue 12).

The old loader built the whole open_clip CLIP with random initialisation drawn from a seed, moved
it to the device and copied the checkpoint over it, text tower included. `load_embedder` now
builds the model empty (meta device), assigns the checkpoint's tensors and keeps only the image
tower. Both are timed here in the same run, on the same checkpoint: random weights for ``--arch``
saved once to a temporary .safetensors file (nothing is downloaded).

Each trial runs in a fresh child process, old and new taking turns, so neither inherits the
other's allocations and each reports its own peak resident memory; the file is in the page cache
for both after the first trial. Timed: from the call to a model ready in eval mode on the device,
imports excluded; then, apart, the digest of the image tower that the embedder's fingerprint needs
(the same work for both, part of `load_embedder`). The two loaders must agree on that digest, or
the run fails.

  .venv/bin/python scripts/bench_load.py                          # ViT-L-14-336, fp32, CPU
  .venv/bin/python scripts/bench_load.py --arch ViT-B-16 --repeats 5
  .venv/bin/python scripts/bench_load.py --device cuda --precision fp16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _old_load(arch: str, checkpoint: str, device: str, precision: str):
    """embedders.py's loader before issue 12, for a checkpoint file (kept here to compare)."""
    import open_clip
    import torch

    from resynth_index.models import embedders

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, _ = embedders._create(arch, precision, device)  # the build the old load used
    open_clip.load_checkpoint(model, checkpoint, strict=True, weights_only=True)
    return model.eval()


def _new_load(arch: str, checkpoint: str, device: str, precision: str):
    """The loader `load_embedder` uses now (the same call, minus the fingerprint: see `child`)."""
    from resynth_index.models.embedders import EmbedderSpec, _load_open_clip

    return _load_open_clip(EmbedderSpec(arch, checkpoint), device, precision)[0]


def child(path: str, arch: str, checkpoint: str, device: str, precision: str) -> None:
    """One trial: load, then print seconds, peak memory, kept parameters and the digest."""
    import logging

    import open_clip  # noqa: F401  (imported before the clock starts, like torch)
    import torch

    from resynth_index.models.fingerprints import hash_state_dict

    logging.disable(logging.WARNING)
    load = _old_load if path == "old" else _new_load
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    model = load(arch, checkpoint, device, precision)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    kept = list(model.parameters()) + list(model.buffers())
    start = time.perf_counter()
    digest = hash_state_dict(model.visual.state_dict())
    result = {
        "seconds": seconds,
        "digest_seconds": time.perf_counter() - start,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "kept_mib": sum(t.numel() * t.element_size() for t in kept) / 2**20,
        "device_mib": (
            torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
        ),
        "digest": digest,
    }
    print(json.dumps(result))


def _save_checkpoint(arch: str, folder: Path) -> Path:
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None, load_weights=False)
    path = folder / f"{arch}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _trial(path: str, args: argparse.Namespace, checkpoint: Path) -> dict:
    command = [sys.executable, __file__, "--child", path, "--arch", args.arch]
    command += ["--device", args.device, "--precision", args.precision]
    command += ["--checkpoint", str(checkpoint)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ViT-L-14-336")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=("old", "new"), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.arch, args.checkpoint, args.device, args.precision)
        return

    import logging

    import torch

    logging.disable(logging.WARNING)  # open_clip's "initialized randomly": that is the point
    with tempfile.TemporaryDirectory(prefix="rsx-bench-load-") as tmp:
        started = time.perf_counter()
        checkpoint = _save_checkpoint(args.arch, Path(tmp))
        size_mib = checkpoint.stat().st_size / 2**20
        print(
            f"{args.arch}: random checkpoint {size_mib:.0f} MiB written in "
            f"{time.perf_counter() - started:.1f} s; {args.repeats} trials each, "
            f"device {args.device}, {args.precision}, torch {torch.__version__}, "
            f"{os.cpu_count()} CPUs",
            flush=True,
        )
        runs: dict[str, list[dict]] = {"old": [], "new": []}
        for i in range(args.repeats):
            for path in ("old", "new") if i % 2 == 0 else ("new", "old"):
                runs[path].append(_trial(path, args, checkpoint))
                print(f"  trial {i + 1} {path}: {runs[path][-1]['seconds']:.2f} s", flush=True)

    digests = {r["digest"] for r in runs["old"] + runs["new"]}
    if len(digests) != 1:
        raise SystemExit(f"the loaders disagree on the image tower's weights: {digests}")
    keys = ("seconds", "peak_rss_mib", "digest_seconds")
    old = {k: statistics.median(r[k] for r in runs["old"]) for k in keys}
    new = {k: statistics.median(r[k] for r in runs["new"]) for k in keys}
    rows = [
        ("load time, median (s)", old["seconds"], new["seconds"], "{:.2f}"),
        ("load time, best (s)", *(min(r["seconds"] for r in runs[p]) for p in runs), "{:.2f}"),
        (
            "then the fingerprint's digest (s)",
            old["digest_seconds"],
            new["digest_seconds"],
            "{:.2f}",
        ),
        ("peak RSS, median (MiB)", old["peak_rss_mib"], new["peak_rss_mib"], "{:.0f}"),
        ("tensors kept (MiB)", runs["old"][0]["kept_mib"], runs["new"][0]["kept_mib"], "{:.0f}"),
    ]
    if args.device.startswith("cuda"):
        peak = [runs[p][0]["device_mib"] for p in ("old", "new")]
        rows.append(("peak device memory (MiB)", *peak, "{:.0f}"))
    print()
    print(f"| {args.arch} ({args.precision}, {args.device}) | old | new | old / new |")
    print("|---|---:|---:|---:|")
    for name, before, after, fmt in rows:
        print(f"| {name} | {fmt.format(before)} | {fmt.format(after)} | {before / after:.2f}x |")
    print(f"\nimage tower weights digest identical in all {2 * args.repeats} trials: yes")


if __name__ == "__main__":
    main()
