"""Build and install mamlen: the packages under their top-level folders, and the C++ kernels through CMake.

`pip install -e .` maps `mamlen.kernels`, `mamlen.core`, `mamlen.train` onto `kernels/`, `core/`, `train/`
and builds `kernels/csrc` with the top-level CMakeLists.txt into the `mamlen.kernels._C` library, which
`mamlen.kernels` loads on import (falling back to the reference ops, with a warning, if it is missing).
Set MAMLEN_NO_CPP=1 to skip the C++ build (e.g. a machine without a compiler).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
LAYERS = ("kernels", "core", "train")


def packages():
    # every folder with an __init__.py below a layer becomes mamlen.<layer>.<sub>
    pkgs, dirs = [], {}
    for layer in LAYERS:
        for init in sorted((ROOT / layer).rglob("__init__.py")):
            rel = init.parent.relative_to(ROOT)
            name = "mamlen." + ".".join(rel.parts)
            pkgs.append(name)
            dirs[name] = str(rel)
    return pkgs, dirs


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configure and build CMakeLists.txt against the installed torch; copy the library to the ext path."""

    def build_extension(self, ext):
        if os.environ.get("MAMLEN_NO_CPP") == "1":
            print("MAMLEN_NO_CPP=1: skipping the C++ kernels; the reference ops will be used")
            return
        import torch  # build requirement: the library links against this torch

        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("cmake not found: install cmake (apt-get install cmake, or pip install cmake), "
                               "or set MAMLEN_NO_CPP=1 to use the reference kernels only")
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = ["-S", str(ROOT), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
               f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
               f"-DPython3_EXECUTABLE={sys.executable}"]
        subprocess.run([cmake, *cfg], check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", str(os.cpu_count() or 1)], check=True)
        built = build_dir / "libmamlen_kernels.so"
        if not built.exists():
            raise RuntimeError(f"CMake finished but {built} is missing")
        dest = Path(self.get_ext_fullpath(ext.name))
        dest.parent.mkdir(parents=True, exist_ok=True)
        # copy then rename: a process that has the old library mapped keeps its inode (copying over it in
        # place crashes such processes)
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.copyfile(built, tmp)
        os.replace(tmp, dest)


PKGS, DIRS = packages()

setup(
    name="mamlen",
    version="0.1.0",
    description="Exact second-order MAML-en-LLM meta-training for Hugging Face causal LMs",
    python_requires=">=3.10",
    packages=PKGS,
    package_dir=DIRS,
    package_data={
        "mamlen.kernels": ["csrc/*.cpp", "csrc/*.h"],
        # the shipped task suite, presets and tokenizer assets are read at run time from the package
        "mamlen.train": ["suite/*.json", "suite/*.md", "suite/settings/*.json", "suite/*/*.jsonl",
                         "presets/*.yaml"],
    },
    ext_modules=[CMakeExtension("mamlen.kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=[
        "torch==2.13.0",  # pinned: on this project's machines 2.13.0 is the local CPU build
        "transformers>=5.0,<6",
        "datasets>=3.0",
        "safetensors>=0.4",
        "pyyaml>=6",
        "tqdm>=4.60",
        "tensorboard>=2.15",
        "matplotlib>=3.7",
        "numpy>=1.24",
        "gguf>=0.10",        # offline default model: SmolLM2-135M from a GGUF file
        "accelerate>=1.0",
    ],
    extras_require={
        # bitsandbytes: the 8-bit moments tests (CPU build; it does not pull another torch)
        # scipy: bench/stats.py (t and noncentral t distributions of the study's intervals and power)
        "test": ["pytest>=8", "pytest-benchmark>=4", "triton>=3.2", "bitsandbytes==0.50.2", "scipy>=1.11"],
        "gpu": ["triton>=3.2", "bitsandbytes>=0.45", "flash-attn>=2.6"],
        "bnb": ["bitsandbytes>=0.45"],
    },
    zip_safe=False,
)
