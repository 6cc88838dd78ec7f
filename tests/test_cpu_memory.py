"""cpu_memory.set_mmap_threshold: freed activations leave the process instead of glibc's heap."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT

PROBE = """
import json, sys, torch
from cpu_memory import set_mmap_threshold
applied = set_mmap_threshold(float(sys.argv[1]))
rss = lambda: next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024  # MiB
big = torch.ones(16 << 20, dtype=torch.uint8); del big   # as after a first step: glibc's threshold grows (to 16 MiB)
blocks = [torch.ones(8 << 20, dtype=torch.uint8) for _ in range(40)]   # 40 activations of 8 MiB, touched
before = rss()
del blocks[::2]                                          # every other one freed: holes glibc cannot trim
print(json.dumps(dict(applied=applied, returned_mib=before - rss())))
"""


def freed_mib(megabytes: float) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, str(megabytes)], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_blocks_leave_the_process_with_the_threshold_and_stay_without():
    on, off = freed_mib(1.0), freed_mib(0)
    if not on["applied"]:
        pytest.skip("not glibc: mallopt did not apply")
    assert not off["applied"]
    assert on["returned_mib"] >= 0.75 * 160, on   # 20 of the 8 MiB blocks freed: most of 160 MiB returned
    assert off["returned_mib"] < 0.25 * 160, off  # glibc's own heap keeps them
