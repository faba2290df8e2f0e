"""What the first run of a model costs in memory, against a later run: the embedded model's conversion from
GGUF, the first load (the weights processed one part at a time and cached), and a later load (the cached
processed weights mapped from disk).

Every step runs in a fresh process on one cache root that starts empty (a temporary directory unless
`--cache` names one), in this order:
  convert   `resolve_embedded("gemma-3-270m")`: the GGUF file dequantized to float32, saved in the cache
  first     `load_model` with no processed weights cached: the weights processed into the entry a part at a
            time, a fresh bridge booted and the entry installed
  later     `load_model` again: the entry installed, memory-mapped
  whole     (with --whole) TransformerLens's whole-model processing (`enable_compatibility_mode()`), what
            the first load did before, for comparison
"peak GB" is the process's peak RSS in 10^9 bytes (ru_maxrss, imports included; `/usr/bin/time -v` gives it in kB).

    python bench/first_load.py --whole
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = ("convert", "first", "later")


def worker(step: str) -> None:
    """One step, printed as a JSON line."""
    import resource

    from circuitlang.cachefiles import use_caches
    from circuitlang.models.embedded import resolve_embedded
    from circuitlang.models.model import load_model

    start = time.perf_counter()
    path = resolve_embedded("gemma-3-270m")
    if step in ("first", "later"):
        with use_caches():
            load_model(path)
    elif step == "whole":
        import torch
        from transformer_lens.model_bridge import TransformerBridge

        from circuitlang.models.model import _quiet

        with _quiet():
            TransformerBridge.boot_transformers(path, device="cpu", dtype=torch.float32).enable_compatibility_mode()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes
    print(json.dumps({"step": step, "peak_gb": peak / 1e9, "seconds": seconds}))


def measure(step: str, cache: Path, threads: int) -> dict:
    env = dict(os.environ, CIRCUITLANG_CACHE=str(cache), PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(threads))
    done = subprocess.run([sys.executable, __file__, "--worker", step], env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{step} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--whole", action="store_true", help="also time TransformerLens's whole-model processing")
    parser.add_argument("--cache", type=Path, help="an empty cache root to use (default: a temporary one)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", choices=(*STEPS, "whole"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    with tempfile.TemporaryDirectory(prefix="circuitlang-first-load-") as tmp:
        cache = args.cache or Path(tmp)
        if cache.exists() and any(cache.iterdir()):
            raise SystemExit(f"{cache} is not empty: the first load needs an empty cache")
        rows = [measure(step, cache, args.threads) for step in (*STEPS, *(("whole",) if args.whole else ()))]
    print("| step | peak GB | s |\n|---|---|---|")
    for row in rows:
        print(f"| {row['step']} | {row['peak_gb']:.2f} | {row['seconds']:.1f} |")
    first, later = rows[1]["peak_gb"], rows[2]["peak_gb"]
    print(f"first load {first:.2f} GB (conversion {rows[0]['peak_gb']:.2f} GB) vs later load {later:.2f} GB")


if __name__ == "__main__":
    main()
