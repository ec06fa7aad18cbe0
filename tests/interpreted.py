"""Running a script under Triton's interpreter, in a subprocess: ``TRITON_INTERPRET`` is read when a
kernel is defined, so a test process that imported Triton without it cannot switch it on."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from importlib.metadata import version

import pytest
import torch

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed (gpu extra)")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                               reason="needs a CUDA GPU and triton (gpu extra)")


def run_interpreted(script: str, timeout: int = 600, fp_fusion: bool = False, interpret: bool = True):
    """The JSON the script prints last, after it ran under ``TRITON_INTERPRET=1`` (with
    ``fp_fusion``, ``TRITON_DEFAULT_FP_FUSION=1`` too; ``interpret=False``: compiled, for a GPU);
    a failing script fails the test with its stderr's end."""
    if interpret and _triton_version() < (3, 8):
        pytest.skip(f"Triton {'.'.join(map(str, _triton_version()))}'s interpreter cannot run these kernels "
                    "(a loop whose bounds are tensors, such as a program id, fails in it); 3.8 can")
    env = dict(os.environ, TRITON_INTERPRET="1") if interpret else dict(os.environ)
    if fp_fusion:
        env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _triton_version() -> tuple[int, ...]:
    return tuple(int(part) for part in version("triton").split(".")[:2])
