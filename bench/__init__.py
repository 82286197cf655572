"""The benchmarks: `python bench/run.py` runs every suite (see run.py); each *_bench.py also runs alone."""
