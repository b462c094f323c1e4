"""equiforce.benchmark: reproducible accuracy benchmarks (``equiforce benchmark rmd17``)."""

from equiforce.benchmark.presets import PRESETS, SIZES, Preset, get_preset
from equiforce.benchmark.rmd17 import (
    PUBLISHED,
    PUBLISHED_SOURCE,
    BenchmarkResult,
    BenchmarkSettings,
    markdown_table,
    run_benchmark,
)

__all__ = [
    "PRESETS",
    "PUBLISHED",
    "PUBLISHED_SOURCE",
    "SIZES",
    "BenchmarkResult",
    "BenchmarkSettings",
    "Preset",
    "get_preset",
    "markdown_table",
    "run_benchmark",
]
