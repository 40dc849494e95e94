"""Lets a script of this folder run as ``python bench/<script>.py`` as well as ``python -m bench.<script>``.

Run as a file, a script finds ``bench/`` itself first on ``sys.path`` (Python puts the script's
folder there), not the repository root, so ``import bench`` alone would fail. A script imports this
module first in that case; it registers this folder as the ``bench`` package, loaded from its own
``__init__.py`` by location, which is what ``python -m`` finds from the repository root. Nothing is
added to ``sys.path``; ``crossmae`` comes from the installed package, as for any other script.
"""

import importlib.util
import sys
from pathlib import Path


def _register_bench_package() -> None:
    if "bench" in sys.modules:
        return
    folder = Path(__file__).resolve().parent
    spec = importlib.util.spec_from_file_location("bench", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = package
    spec.loader.exec_module(package)


_register_bench_package()
