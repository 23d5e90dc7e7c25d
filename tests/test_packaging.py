"""A built wheel carries the CUDA sources: installed outside the source tree, the launcher finds them
and what it hands to CuPy compiles with NVRTC (no GPU needed)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_kernels_compile import CUPY_APPENDED_OPTIONS, _load_nvrtc, nvrtc_compile

REPO = Path(__file__).resolve().parent.parent


def test_wheel_install_finds_and_compiles_kernels(tmp_path):
    nvrtc = _load_nvrtc()
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(REPO)], check=True, capture_output=True, text=True)
    wheel = next(wheels.glob("promoe_gguf-*.whl"))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, text=True)
    probe = (
        "import json, promoe_gguf\n"
        "from promoe_gguf.kernels import launch\n"
        "src = launch.module_source('matvec', 'Q4_K')\n"
        "print(json.dumps({'pkg': promoe_gguf.__file__, 'dir': str(launch.kernels_dir()),"
        " 'code': src.code, 'options': list(src.options), 'names': list(src.kernel_names)}))\n")
    # run from outside the repository, the installed copy first on the path (the editable install's
    # finder comes after it); the dependencies (torch, gguf) come from this environment
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, check=True)
    info = json.loads(out.stdout)
    assert info["pkg"].startswith(str(site)), info["pkg"]
    assert info["dir"].startswith(str(site)), info["dir"]
    rc, log, cubin, _ = nvrtc_compile(nvrtc, info["code"], "matvec.cu",
                                      tuple(info["options"]) + CUPY_APPENDED_OPTIONS + ("-arch=sm_90",))
    assert rc == 0, log
    assert cubin and all(n.encode() in cubin for n in info["names"])
