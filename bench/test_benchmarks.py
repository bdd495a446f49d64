"""Every benchmark case as a pytest-benchmark test (ids: benchmark-shape-provider-dtype).

Run with ``pytest bench/ --benchmark-only``; see ``bench/conftest.py`` for the options.
"""
from gitfast.bench import timing


def test_case(bench_case, bench_settings, benchmark):
    case = bench_case
    device = bench_settings["device"]
    benchmark.group = f"{case.benchmark} {case.dtype} {case.label}"
    benchmark.extra_info.update(benchmark=case.benchmark, shape=case.shape, provider=case.provider,
                                dtype=case.dtype, device=device, flops=case.flops, bytes=case.bytes)
    benchmark(timing.synchronized(case.fn, device))
    stats = getattr(benchmark, "stats", None)
    if stats is not None and stats.stats.median > 0:    # absent under --benchmark-disable
        seconds = stats.stats.median
        if case.flops:
            benchmark.extra_info["tflops"] = case.flops / seconds / 1e12
        if case.bytes:
            benchmark.extra_info["tbps"] = case.bytes / seconds / 1e12
