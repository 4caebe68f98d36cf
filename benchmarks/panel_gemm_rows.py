"""SmolLM2-135M's 121 linear layers in fp32 at 1-64 rows (the eighteenth session's command):
now `benchmarks/linear_paths.py --dtypes float32 --rows 1,4,8,16,32,64`, which times our
panels, oneDNN's packed layout and F.linear side by side.

    PYTHONPATH=. .venv/bin/python benchmarks/panel_gemm_rows.py [linear_paths.py options]
"""

from __future__ import annotations

import sys

import linear_paths  # this script's folder is on sys.path when it runs

if __name__ == "__main__":
    sys.argv[1:] = ["--dtypes", "float32", "--rows", "1,4,8,16,32,64", *sys.argv[1:]]
    linear_paths.main()
