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


def _page_faults(keep: bool) -> int:
    out = subprocess.run([sys.executable, "-c", FAULTS, "1" if keep else "0"], capture_output=True, text=True,
                         check=True, timeout=60)
    return int(out.stdout)


def test_message_buffers_are_reused_instead_of_faulted_in_afresh():
    default, kept = _page_faults(False), _page_faults(True)
    assert default > 100 * 4 * 200  # glibc trims the freed heap top: each buffer's 256 pages fault anew
    assert kept < default / 20
