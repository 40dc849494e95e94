"""The compiled extension: CMake run directly and through setup.py build the same ops."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from crossmae.ops import cpu_attention

ROOT = Path(__file__).resolve().parents[1]
# the cmake that setup.py uses: beside this Python (the PyPI package), else the one on PATH
CMAKE_BESIDE_PYTHON = Path(sys.executable).parent / "cmake"
CMAKE = str(CMAKE_BESIDE_PYTHON) if CMAKE_BESIDE_PYTHON.exists() else shutil.which("cmake")

# Prints, as JSON, the schemas of the crossmae ops that running {load} registers.
LIST_NEW_OPS = """
import json
import torch
import crossmae

def names():
    return {name for name in torch._C._dispatch_get_all_op_names() if name.startswith("crossmae::")}

before = names()
{load}
print(json.dumps(sorted(str(getattr(torch.ops.crossmae, name.split("::")[1]).default._schema)
                        for name in names() - before)))
"""


def registered_ops(load: str) -> list[str]:
    code = LIST_NEW_OPS.replace("{load}", load)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.skipif(cpu_attention.unavailable_reason() is not None, reason="crossmae._C is not built")
@pytest.mark.skipif(CMAKE is None, reason="needs cmake")
def test_direct_cmake_build_registers_the_same_ops_as_setup_py(tmp_path):
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run([CMAKE, "-S", str(ROOT), "-B", str(tmp_path), *generator, f"-DPython_EXECUTABLE={sys.executable}",
                    "-DCMAKE_BUILD_TYPE=Release"], check=True, capture_output=True)
    subprocess.run([CMAKE, "--build", str(tmp_path), "--parallel", str(os.cpu_count() or 1)], check=True,
                   capture_output=True)
    (library,) = tmp_path.glob("_C*.so")

    direct = registered_ops(f"torch.ops.load_library({str(library)!r})")
    installed = registered_ops("import crossmae._C")
    assert direct == installed
    assert [s.split("(")[0] for s in installed] == ["crossmae::varlen_attn_cpu_bwd", "crossmae::varlen_attn_cpu_fwd"]
