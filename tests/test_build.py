"""Build and packaging: CMake run directly and through setup.py build the same ops; version, extras,
license, citation and the sdist's contents."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

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


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_version_is_written_once():
    import importlib.metadata

    import crossmae

    project = pyproject()["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert pyproject()["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "crossmae.__version__"}
    assert importlib.metadata.version("crossmae") == crossmae.__version__
    assert "version" not in (ROOT / "CITATION.cff").read_text().split("references:")[0].replace("cff-version", "")


def test_extras_name_what_each_backend_needs_and_the_readme_says_so():
    extras = pyproject()["project"]["optional-dependencies"]
    names = {extra: {re.split(r"[<>=\[ ]", dep)[0] for dep in deps} for extra, deps in extras.items()}
    assert {"nvidia-ml-py", "pytest-benchmark"} <= names["gpu"]
    assert names["flash"] == {"flash-attn"} and names["xformers"] == {"xformers"} and names["triton"] == {"triton"}
    readme = (ROOT / "README.md").read_text()
    for extra in ("gpu", "flash", "xformers", "triton"):
        assert f"crossmae[{extra}]" in readme, extra
    assert "torch" not in {d for deps in names.values() for d in deps}  # torch comes first, chosen by the user


def test_license_and_citation():
    assert pyproject()["project"]["license"] == "MIT"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["cff-version"] == "1.2.0" and citation["license"] == "MIT" and citation["authors"]
    titles = " | ".join(ref["title"] for ref in citation["references"])
    assert "Rethinking Patch Dependence for Masked Autoencoders" in titles  # CrossMAE
    assert "FlashAttention" in titles
    assert all(ref["notes"] and ref["authors"] and ref["year"] for ref in citation["references"])


@pytest.mark.skipif(importlib.util.find_spec("build") is None, reason="needs the `build` package (the dev extra)")
def test_sdist_carries_the_extension_sources(tmp_path):
    subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    (sdist,) = tmp_path.glob("crossmae-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "kernels" / "csrc").rglob("*") if p.is_file()}
    assert sources and sources <= names, sources - names
    assert {"CMakeLists.txt", "setup.py", "pyproject.toml", "LICENSE", "CITATION.cff", "README.md"} <= names
    assert not [n for n in names if n.endswith(".so")]
