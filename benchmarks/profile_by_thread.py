"""A py-spy raw profile (`py-spy record -f raw --threads`) -> one thread's inclusive and
self time, by function.

    python benchmarks/profile_by_thread.py /tmp/prof/decode.txt engine-loop
"""

from __future__ import annotations

import collections
import re
import sys


def main(path: str, thread: str) -> None:
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    with open(path) as lines:
        for line in lines:
            stack, _, count = line.rstrip().rpartition(" ")
            frames = stack.split(";")
            if thread not in frames[0]:
                continue
            n = int(count)
            total += n
            names = [re.sub(r" \((.*?):\d+\)", r" (\1)", f) for f in frames[1:]]
            if names:
                own[names[-1]] += n
            for name in set(names):
                inclusive[name] += n
    print(f"{thread}: {total} samples")
    for title, counter, rows in (("inclusive", inclusive, 40), ("self", own, 15)):
        print(f"top {title}:")
        for name, n in counter.most_common(rows):
            print(f"  {100 * n / max(total, 1):5.1f}%  {name[:120]}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
