"""Install crossmae and its kernels.

The ``kernels/`` folder installs under the import name ``crossmae_kernels`` (PyPI already has a
package called ``kernels``).
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["crossmae", "crossmae.*"]) + ["crossmae_kernels"],
    package_dir={"crossmae_kernels": "kernels"},
)
