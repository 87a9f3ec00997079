"""What a benchmark ran on (for the results files)."""
from fbcompile.bench import cpu_name  # noqa: F401  (kept here: the benchmarks import it from machine)
