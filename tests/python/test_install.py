"""`pip install --no-build-isolation .` with Debian's pip and setuptools, into a virtual
environment that sees the system NumPy, reusing this build's CMake tree (HM_BUILD_DIR, set by
ctest), so the install is checked without building the engine a second time."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT


def test_pip_install_into_a_venv(tmp_path):
    build = os.environ.get("HM_BUILD_DIR")
    if not build:
        pytest.fail("set HM_BUILD_DIR to the CMake build tree that made the module (ctest does)")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    env = {**os.environ, "HM_CMAKE_BUILD_DIR": build, "PIP_NO_INDEX": "1"}
    env.pop("PYTHONPATH", None)
    r = subprocess.run([str(venv / "bin" / "pip"), "install", "--no-build-isolation", "--no-deps", "-q", ROOT],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    code = ("import numpy as np, hybrid_mamba, honest_mamba\n"
            "assert hybrid_mamba.__file__.startswith(%r)\n"
            "m = honest_mamba.HybridMambaModel(hybrid_mamba.HybridMambaConfig.from_preset('tiny'))\n"
            "print(m.generate(np.array([[1, 2, 3]]), 4).shape)\n" % str(venv))
    r = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, env=env,
                       cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "(1, 7)", r.stdout + r.stderr
