"""Generator load time: a diffusers folder loaded with and without `low_cpu_mem_usage` (issue 12).

With the `accelerate` package installed, diffusers can build a pipeline's models empty and assign
the checkpoint's tensors (`low_cpu_mem_usage=True`, what `DiffusersGenerator` and the
reconstruction signal ask for whenever accelerate is there); without it, it falls back to
`low_cpu_mem_usage=False`. Both are timed here in the same run, on the same folder: an SD1.5-size
pipeline (the published UNet, VAE and CLIP text encoder configs of `gpu_bench.py`) with random
weights, saved once to a temporary folder as safetensors (nothing is downloaded). accelerate is
not a dependency of rsx: `pip install accelerate` to run this. Measured with diffusers 0.42 on the
2-core CPU machine, the difference was small (0.88 s against 0.77 s for the 4 GiB folder), so rsx
does not require it.

Each trial runs in a fresh child process, the two taking turns, so neither inherits the other's
allocations; the folder is in the page cache for both after the first trial. Timed: the
`from_pretrained` call with the options `DiffusersGenerator._load_folder` passes (imports
excluded). The two loads must give the same UNet weights (checked on a sample of tensors), or
the run fails.

  .venv/bin/python scripts/bench_load_generator.py                # SD1.5 sizes, fp32, CPU
  .venv/bin/python scripts/bench_load_generator.py --tiny         # toy sizes (a smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def child(folder: str, low_cpu_mem_usage: bool) -> dict:
    """Load ``folder`` once; the seconds it took and a digest of a few UNet tensors."""
    import hashlib

    import torch
    from diffusers import DiffusionPipeline

    start = time.perf_counter()
    pipe = DiffusionPipeline.from_pretrained(
        folder,
        local_files_only=True,
        torch_dtype=torch.float32,
        trust_remote_code=False,
        low_cpu_mem_usage=low_cpu_mem_usage,
        safety_checker=None,
    )
    seconds = time.perf_counter() - start
    digest = hashlib.sha256()
    state = pipe.unet.state_dict()
    for name in sorted(state)[::25]:
        digest.update(state[name].detach().contiguous().view(torch.uint8).numpy().tobytes())
    return {"seconds": seconds, "digest": digest.hexdigest()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="toy sizes (logic check)")
    parser.add_argument("--child", nargs=2, metavar=("FOLDER", "LOW_CPU_MEM_USAGE"))
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1] == "1")))
        return 0

    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        raise SystemExit("accelerate is not installed: low_cpu_mem_usage cannot be measured")
    from gpu_bench import build_pipeline

    with tempfile.TemporaryDirectory(prefix="rsx-bench-gen-load-") as tmp:
        folder = Path(tmp) / "sd15"
        start = time.perf_counter()
        build_pipeline("sd15", "cpu", tiny=args.tiny).save_pretrained(folder)
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        print(f"saved {size / 2**30:.2f} GiB in {time.perf_counter() - start:.1f} s", flush=True)
        times: dict[str, list[float]] = {"random init, then copy": [], "built empty": []}
        digests = set()
        for _ in range(args.repeats):
            for name, flag in (("random init, then copy", "0"), ("built empty", "1")):
                out = subprocess.run(
                    [sys.executable, __file__, "--child", str(folder), flag],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                result = json.loads(out.strip().splitlines()[-1])
                times[name].append(result["seconds"])
                digests.add(result["digest"])
                print(f"  {name}: {result['seconds']:.2f} s", flush=True)
        if len(digests) != 1:
            raise SystemExit("the two loads gave different UNet weights")
    old = statistics.median(times["random init, then copy"])
    new = statistics.median(times["built empty"])
    load = os.getloadavg()[0]
    kind = "toy" if args.tiny else "SD1.5"
    cpus = os.cpu_count()
    print(f"\n{kind} pipeline, fp32, CPU, {cpus} CPUs, load average {load:.2f} at the end")
    print("| load | median | runs |")
    print("|---|---|---|")
    for name, values in times.items():
        runs = ", ".join(f"{v:.2f}" for v in values)
        print(f"| {name} | {statistics.median(values):.2f} s | {runs} |")
    print(f"| ratio old / new | {old / new:.2f}x | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
