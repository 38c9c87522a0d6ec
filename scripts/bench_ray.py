"""Toy-zoo resynthesis through Ray (N actors) against the local executor, in one run.

    .venv/bin/python scripts/bench_ray.py [--captions 24] [--batch-size 4] [--actors 2]
                                          [--in-process-only] [--json]

``scripts/bench.py`` runs it with ``--in-process-only --json`` for its Ray rows (in a process of
its own: this script holds every process to one compute thread).

Copies of one fresh toy lab make the same resyntheses with the local executor and with the Ray
executor. Prints a table: wall time, images per second, and the ratio to the local row of its
kind.

- "command" rows time what a user runs: ``rsx resynthesize --captions FILE`` in a fresh process,
  from its start to its exit (imports, model loading, generation, storing), locally, with
  ``--executor ray`` starting a Ray for the call, and with ``--executor ray --ray-address ADDR``
  joining a running Ray (how a lab that scaled out works: its cluster is up).
- "in process" rows call the library with the embedder already loaded: "cold" includes starting
  the actor pool (a process per actor, importing torch and diffusers and loading each generator),
  which the local path, already in a process that imported them, does not pay; "warm" is a
  second, equal run on fresh captions through the same runner, its pool already up (what a long
  run's steady state costs).

Every process is held to one compute thread (as the tests are), so N actors may use N cores where
local uses one: on a machine with fewer free cores than actors the ratio says more about the
machine than Ray.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

GENERATORS = {"toy-a": 11, "toy-b": 22}


def _captions(n: int, run: str) -> list[str]:
    return [f"{run}: a toy picture number {i} of a red house" for i in range(n)]


def _lab(root: Path) -> Path:
    from resynth_index.lab import Lab

    with Lab.create(root, embedder="toy") as lab:
        for name, seed in GENERATORS.items():
            lab.add_toy_generator(name, seed)
    return root


def _run(lab_dir: Path, captions: list[str], batch_size: int, runner_of=None) -> tuple:
    """(seconds, images generated) for one resynthesize call: local, or through the Ray runner
    ``runner_of(lab)`` makes (None: local)."""
    from resynth_index.lab import Lab
    from resynth_index.pipeline import resynthesis

    texts = resynthesis.captions_by_hash(captions)
    with Lab.open(lab_dir) as lab:
        generators = resynthesis.runnable_generators(lab)
        lab.embedder  # noqa: B018 - load the embedder before the clock starts, on both paths
        start = time.perf_counter()
        if runner_of is None:
            summary = resynthesis.resynthesize(lab, texts, generators, batch_size=batch_size)
        else:
            summary = runner_of(lab).resynthesize(texts, generators, batch_size=batch_size)
        return time.perf_counter() - start, summary.generated


def _command(lab_dir: Path, captions: Path, batch_size: int, *ray_args: str) -> float:
    """Seconds one ``rsx resynthesize`` process takes, from its start to its exit."""
    rsx = Path(sys.executable).with_name("rsx")
    args = [str(rsx), "--lab", str(lab_dir), "resynthesize", "--captions", str(captions)]
    args += ["--batch-size", str(batch_size), *ray_args]
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stdout}{done.stderr}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--in-process-only", action="store_true", help="skip the command rows")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON only")
    args = parser.parse_args(argv)

    import ray

    from resynth_index.distributed.executor import RayResynthesizer
    from resynth_index.distributed.session import RayOptions

    images = args.captions * len(GENERATORS)
    rows = []
    with tempfile.TemporaryDirectory(prefix="rsx-bench-ray-") as tmp:
        template = _lab(Path(tmp) / "template")
        copies = {
            name: shutil.copytree(template, Path(tmp) / name)
            for name in ("local", "ray", "cli-local", "cli-ray-start", "cli-ray-join")
        }
        local_lab, ray_lab = copies["local"], copies["ray"]
        captions_file = Path(tmp) / "captions.txt"
        captions_file.write_text("\n".join(_captions(args.captions, "command")), encoding="utf-8")
        actors = ("--executor", "ray", "--ray-actors", str(args.actors))
        if not args.in_process_only:
            local_s = _command(copies["cli-local"], captions_file, args.batch_size)
            rows.append(("command, local", images, local_s, 1.0))
            # before this process starts its Ray: the command starts (and stops) one of its own
            start_s = _command(copies["cli-ray-start"], captions_file, args.batch_size, *actors)
            started = f"command, ray x{args.actors}, starting Ray"
            rows.append((started, images, start_s, start_s / local_s))
        ray.init(num_cpus=args.actors, include_dashboard=False, log_to_driver=False)
        if not args.in_process_only:
            address = ray.get_runtime_context().gcs_address
            join = (*actors, "--ray-address", address)
            join_s = _command(copies["cli-ray-join"], captions_file, args.batch_size, *join)
            joining = f"command, ray x{args.actors}, joining"
            rows.append((joining, images, join_s, join_s / local_s))
        runner = None

        def runner_of(lab):
            # one runner, so the second run finds the actor pool up (its labs are equal copies)
            nonlocal runner
            if runner is None:
                runner = RayResynthesizer(lab, RayOptions(actors=args.actors))
            runner.lab = lab
            return runner

        try:
            for run in ("cold", "warm"):
                captions = _captions(args.captions, run)
                local_s, local_n = _run(local_lab, captions, args.batch_size)
                ray_s, ray_n = _run(ray_lab, captions, args.batch_size, runner_of)
                assert local_n == ray_n, (local_n, ray_n)
                rows.append((f"in process, local ({run})", local_n, local_s, 1.0))
                rows.append(
                    (f"in process, ray x{args.actors} ({run})", ray_n, ray_s, ray_s / local_s)
                )
        finally:
            if runner is not None:
                runner.close()
            ray.shutdown()
    if args.json:
        keys = ("name", "images", "seconds", "ratio")
        print(json.dumps([dict(zip(keys, row, strict=True)) for row in rows]))
        return 0
    print(f"toy zoo, {len(GENERATORS)} generators, batch {args.batch_size}, {os.cpu_count()} CPUs")
    load = os.getloadavg()[0]
    print(f"load average {load:.2f} at the end")
    print(f"{'executor':<36} {'images':>7} {'seconds':>8} {'img/s':>7} {'time / local':>13}")
    for name, made, seconds, ratio in rows:
        print(f"{name:<36} {made:>7} {seconds:>8.2f} {made / seconds:>7.2f} {ratio:>13.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
