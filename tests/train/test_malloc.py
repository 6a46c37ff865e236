import subprocess
import sys

import pytest

CHILD = """
import resource, sys, torch
from nanoseek.train.malloc import keep_freed_memory
if sys.argv[1] == "keep" and not keep_freed_memory():
    print("unsupported"); raise SystemExit
def faults_of_fresh_tensor():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.zeros(16 << 20)  # 64 MiB, zero-filled: every page touched
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_fresh_tensor()
print(faults_of_fresh_tensor())
"""


def second_allocation_faults(mode: str) -> str:
    return subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True).stdout.strip()


def test_freed_pages_are_reused():
    """With the setting, a second 64 MiB tensor reuses the first one's pages (almost no page faults);
    without it, glibc maps fresh pages again (one fault per page)."""
    kept = second_allocation_faults("keep")
    if kept == "unsupported":
        pytest.skip("no glibc mallopt on this platform")
    default = int(second_allocation_faults("default"))
    assert int(kept) < 100 < default
