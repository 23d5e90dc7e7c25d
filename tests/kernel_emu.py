"""The kernel emulation for tests: skipped, not failed, where no C++ compiler is installed."""
import shutil

import pytest

from promoe_gguf.kernels.emulator import Emu, build_emulator as _build

__all__ = ["Emu", "build_emulator"]


def build_emulator():
    if shutil.which("g++") is None:
        pytest.skip("g++ not installed: the CPU emulation of the CUDA kernels needs a C++20 compiler")
    return _build()
