"""Shared fixtures of the Python suite. Run by ctest (test `python`), which sets PYTHONPATH to
<build>/python and HM_BIN to the hm binary of the same build; by hand:
    PYTHONPATH=build/python HM_BIN=build/hm python3 -m pytest tests/python
"""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def hm_bin():
    path = os.environ.get("HM_BIN") or shutil.which("hm")
    if not path or not os.access(path, os.X_OK):
        pytest.fail("set HM_BIN to the hm binary of the build that made the module (ctest does)")
    return path


def run_hm(*args, check=True, text=True):
    r = subprocess.run([hm_bin(), *map(str, args)], capture_output=True, text=text,
                       env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    if check and r.returncode != 0:
        raise AssertionError(f"hm {' '.join(map(str, args))} exited {r.returncode}: {r.stderr}")
    return r


@pytest.fixture(scope="session")
def hm():
    return run_hm


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """`hm init --preset tiny`: a byte-level checkpoint written by the CLI."""
    d = tmp_path_factory.mktemp("tiny") / "model"
    run_hm("init", "--preset", "tiny", "--seed", "3", "--out", d)
    return d


@pytest.fixture(scope="session")
def true_tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("true_tiny") / "model"
    run_hm("init", "--preset", "true-tiny", "--seed", "4", "--out", d)
    return d


@pytest.fixture(scope="session")
def torch_peer():
    """bench/torch_peer.py, the PyTorch implementation the golden tests compare against."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import torch_peer as peer  # noqa: E402  (needs python3-torch, installed by setup.sh)
    return peer
