"""Install crossmae, its Triton kernels and its compiled extension.

The ``kernels/`` folder installs under the import name ``crossmae_kernels`` (PyPI already has a
package called ``kernels``). The compiled extension ``crossmae._C`` is built by CMake:
``CMakeLists.txt`` lists every compiled source, and this file only drives it. torch must be
importable while building, so install torch first and build without isolation:

    pip install --no-build-isolation -e .      # or: pip install --no-build-isolation .
    python -m build --no-isolation             # an sdist and a wheel (with the extension) in dist/

The sdist carries the extension's sources (``MANIFEST.in``); the wheel carries Python files and the
built extension only.

Environment variables:
    MAX_JOBS                   parallel compile jobs (default: the number of CPUs)
    CMAKE_BUILD_TYPE           Release (default), RelWithDebInfo or Debug
    CMAKE_ARGS                 extra arguments for the CMake configure step
    CROSSMAE_SKIP_EXTENSION=1  install without the extension; the ``cpu`` attention backend then
                               reports itself unavailable and every other backend works
"""

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
SKIP_EXTENSION = os.environ.get("CROSSMAE_SKIP_EXTENSION", "0").lower() not in ("", "0", "false", "no")


class CMakeExtension(Extension):
    """An extension module that CMake builds (its sources are listed in CMakeLists.txt, not here)."""

    def __init__(self, name: str, target: str):
        super().__init__(name, sources=[])
        self.target = target


class CMakeBuild(build_ext):
    """Configures, builds and installs each CMakeExtension's target into the package folder."""

    def build_extension(self, ext: CMakeExtension) -> None:
        try:
            import torch  # noqa: F401
        except ImportError as exc:
            raise RuntimeError(
                f"building {ext.name} needs torch in the build environment ({exc}): install torch first and run "
                "`pip install --no-build-isolation .`, or set CROSSMAE_SKIP_EXTENSION=1 to install without it"
            ) from exc
        cmake = _find_cmake()
        build_type = os.environ.get("CMAKE_BUILD_TYPE", "Release")
        # one persistent build folder per Python environment and build type, so rebuilds are incremental
        env_key = hashlib.sha1(sys.prefix.encode()).hexdigest()[:8]
        build_dir = ROOT / "build" / f"cmake-{sys.implementation.cache_tag}-{env_key}-{build_type}"
        ext_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        prefix = ext_path.parents[ext.name.count(".")]  # the folder holding the top-level package

        configure = [
            cmake, "-S", str(ROOT), "-B", str(build_dir),
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DPython_EXECUTABLE={sys.executable}",
            *shlex.split(os.environ.get("CMAKE_ARGS", "")),
        ]
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.run(configure, check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--config", build_type, "--target", ext.target,
                        "--parallel", jobs], check=True)
        subprocess.run([cmake, "--install", str(build_dir), "--config", build_type, "--component", ext.target,
                        "--prefix", str(prefix)], check=True)
        if not ext_path.exists():
            raise RuntimeError(f"CMake installed no {ext_path.name} in {ext_path.parent}")


def _find_cmake() -> str:
    """The cmake beside this Python (the PyPI package), else the one on PATH."""
    beside = Path(sys.executable).parent / "cmake"
    found = str(beside) if beside.exists() else shutil.which("cmake")
    if found is None:
        raise RuntimeError("building crossmae._C needs CMake >= 3.21: `pip install cmake`, or your system's package")
    return found


setup(
    packages=find_packages(include=["crossmae", "crossmae.*"]) + ["crossmae_kernels"],
    package_dir={"crossmae_kernels": "kernels"},
    include_package_data=False,  # kernels/csrc/ is the extension's source, built into crossmae._C, not package data
    ext_modules=[] if SKIP_EXTENSION else [CMakeExtension("crossmae._C", target="_C")],
    cmdclass={"build_ext": CMakeBuild},
)
