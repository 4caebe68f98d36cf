"""The offline engine decoding one stream (600 tokens) for py-spy:

    .venv/bin/py-spy record -r 250 --native -f raw -o OUT.raw -- \
        .venv/bin/python pyspy_batch1_script.py bfloat16
"""

import sys
import time

from splitserve.common.sampling_params import SamplingParams
from splitserve.llm import LLM

llm = LLM(model="smollm2-135m", dtype=sys.argv[1], num_threads=2)
prompt = list(range(100, 356))
llm.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.0))
print("go", flush=True)
start = time.perf_counter()
llm.generate([prompt], SamplingParams(max_tokens=600, ignore_eos=True, temperature=0.0))
print("step ms", (time.perf_counter() - start) / 600 * 1e3)
