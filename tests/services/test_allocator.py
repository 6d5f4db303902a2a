import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

# 100 rounds of four message-sized buffers alive at once, filled, then freed, as a call streaming an image in
# 1 MiB chunks holds them (received, assembled, forwarded); prints the page faults
FAULTS = """
import resource, sys
from sdxl_services.allocator import keep_message_buffers
if sys.argv[1] == "1":
    assert keep_message_buffers()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(100):
    buffers = [bytearray(1 << 20) for _ in range(4)]
    for buffer in buffers:
        buffer[::4096] = b"x" * 256
    del buffers, buffer
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


# glibc's default thresholds (128 KiB) with its dynamic raising of them switched off, as these variables do: how
# much of the freed heap glibc keeps otherwise depends on what the process allocated before, so the baseline would
# be anywhere between this worst case and no faults at all
WORST_CASE = {"MALLOC_MMAP_THRESHOLD_": str(128 << 10), "MALLOC_TRIM_THRESHOLD_": str(128 << 10)}


def _page_faults(keep: bool) -> int:
    out = subprocess.run([sys.executable, "-c", FAULTS, "1" if keep else "0"], capture_output=True, text=True,
                         check=True, timeout=60, env={**os.environ, **WORST_CASE})
    return int(out.stdout)


def test_message_buffers_are_reused_instead_of_faulted_in_afresh():
    default, kept = _page_faults(False), _page_faults(True)
    assert default > 100 * 4 * 200  # every buffer mmapped afresh: its 256 pages fault anew
    assert kept < default / 20
