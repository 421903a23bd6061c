"""The rank's heap keeps a step's freed activations for the next step (parallel/heap.py)."""
import os
import subprocess
import sys

import pytest

STEPS = """
import resource, sys
import numpy as np
from distbp.parallel import heap
kept = heap.keep_freed_memory() if sys.argv[1] == "keep" else None

def step():  # a step's activations: ten 3 MB arrays, written, then freed
    arrays = [np.ones(3 << 18, np.float32) for _ in range(10)]
    del arrays

step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(kept, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def run_steps(mode: str, **env) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}).stdout.split()
    return out[0], float(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                    reason="glibc's malloc only")
def test_freed_activations_are_not_faulted_in_again_each_step():
    """glibc's defaults hand a step's 30 MB back to the kernel and fault it in again (~7,700 page faults a step);
    with the thresholds fixed the next step reuses it (none). A user's MALLOC_*_ variables stand."""
    kept, faults = run_steps("keep")
    default = run_steps("default")[1]
    assert kept == "True" and faults < 100 and default > 3000, (faults, default)
    kept, faults = run_steps("keep", MALLOC_TRIM_THRESHOLD_="131072")
    assert kept == "False" and faults > 3000  # the user's setting is left as it is
