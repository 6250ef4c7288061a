"""Installation: `MAMLEN_NO_CPP=1 pip install -e .` builds on a fresh copy of the tree (the C++ extension is not
declared when it is not built), and the installed transformers is within the range setup.py declares."""
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def test_installed_transformers_is_in_the_declared_range():
    # read setup.py itself: an editable install's metadata is as old as the last `pip install -e .`
    declared = [Requirement(r) for r in re.findall(r'"(transformers[<>=!~ ][^"]*)"', (ROOT / "setup.py").read_text())]
    assert len(declared) == 1, declared
    version = importlib.metadata.version("transformers")
    assert declared[0].specifier.contains(version), \
        f"transformers {version} is installed, setup.py declares {declared[0].specifier}"


@pytest.mark.slow
def test_editable_install_without_cpp(tmp_path):
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if files.returncode != 0:
        pytest.skip("not a git checkout")
    src = tmp_path / "src"
    for rel in files.stdout.splitlines():  # a fresh clone: tracked files only, no build/ or .so
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_bytes((ROOT / rel).read_bytes())
    # pip's editable build step (PEP 660) without installing: `pip install --prefix` would uninstall this
    # environment's own mamlen first
    code = "from setuptools import build_meta; print(build_meta.build_editable(%r))" % str(tmp_path / "wheel")
    (tmp_path / "wheel").mkdir()
    out = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "MAMLEN_NO_CPP": "1"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "MAMLEN_NO_CPP=1: not building the C++ kernels" in out.stdout
    wheel = out.stdout.strip().splitlines()[-1]
    assert wheel.startswith("mamlen-0.1.0") and (tmp_path / "wheel" / wheel).is_file()
    assert not list(src.rglob("_C*.so"))
