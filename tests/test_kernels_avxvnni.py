"""The AVX-VNNI paths, checked on CPUs that have AVX-512 VNNI but not AVX-VNNI (AMD Zen 4, Intel Ice Lake).

AVX-VNNI's vpdpbusd is the VEX encoding of AVX-512 VNNI's 256-bit one, same sums. A build with
``-DBC_AVXVNNI_VIA_EVEX`` (``csrc/avxvnni.h``) runs the avxvnni code with the EVEX instruction, so the same exactness
tests that run on real AVX-VNNI CPUs (every ``avxvnni`` case of test_kernels.py and test_export.py) run here too, in a
child process with its own build of both libraries. Where the CPU has AVX-VNNI those tests run directly, and this one
skips; where it has neither, nothing can run them.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bitconvert import kernels

TESTS = Path(__file__).parent
CHILD = """
import sys
import pytest
from bitconvert import kernels
from bitconvert.export import runtime
kernels.CFLAGS.append("-DBC_AVXVNNI_VIA_EVEX")  # both build folders are keyed by their flags: separate builds
runtime.FLAGS.append("-DBC_AVXVNNI_VIA_EVEX")
assert "avxvnni" in kernels.supported_isas(), "the EVEX build does not offer the avxvnni path"
sys.exit(pytest.main(sys.argv[1:]))
"""


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    match = re.search(r"^flags\s*:(.*)$", text, re.MULTILINE)
    return set(match.group(1).split()) if match else set()


def test_avxvnni_paths_through_their_evex_encoding():
    if "avxvnni" in kernels.supported_isas():
        pytest.skip("this CPU has AVX-VNNI: test_kernels.py and test_export.py run the avxvnni paths themselves")
    if not {"avx512vl", "avx512_vnni"} <= _cpu_flags():
        pytest.skip("this CPU has neither AVX-VNNI nor AVX-512 VL + VNNI")
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(TESTS / "test_kernels.py"), str(TESTS / "test_export.py"),
         "-k", "avxvnni", "-q", "-rs", "-p", "no:cacheprovider"],
        capture_output=True, text=True, timeout=1800,
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, report[-4000:]
    passed = re.search(r"(\d+) passed", report)
    assert passed and int(passed.group(1)) >= 16, report[-4000:]  # 12 kernel and 4 ORT cases: none may skip
    assert "skipped" not in report, report[-4000:]
