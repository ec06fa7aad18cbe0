"""Running a script under Triton's interpreter, in a subprocess: ``TRITON_INTERPRET`` is read when a
kernel is defined, so a test process that imported Triton without it cannot switch it on."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def run_interpreted(script: str, timeout: int = 600, fp_fusion: bool = False, interpret: bool = True):
    """The JSON the script prints last, after it ran under ``TRITON_INTERPRET=1`` (with
    ``fp_fusion``, ``TRITON_DEFAULT_FP_FUSION=1`` too; ``interpret=False``: compiled, for a GPU);
    a failing script fails the test with its stderr's end."""
    env = dict(os.environ, TRITON_INTERPRET="1") if interpret else dict(os.environ)
    if fp_fusion:
        env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
