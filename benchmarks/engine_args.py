"""The options every engine benchmark script here shares (run as `python benchmarks/X.py`:
the script's folder is on sys.path, so `from engine_args import engine_parser` finds this)."""

from __future__ import annotations

import argparse


def engine_parser(doc: str | None, dtype: str = "bfloat16") -> argparse.ArgumentParser:
    """A parser with the script's docstring as its help and --model, --dtype, --threads."""
    ap = argparse.ArgumentParser(description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default=dtype)
    ap.add_argument("--threads", type=int, default=2)
    return ap
