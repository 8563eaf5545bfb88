"""Only what pyproject.toml cannot say: configs/ (at the top of the checkout, where the docs'
commands name it) ships inside the package as fedjax_lab/configs, so an installed lab finds its
configs from any folder (runs.CONFIGS)."""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["fedjax_lab*"]) + ["fedjax_lab.configs"],
      package_dir={"fedjax_lab.configs": "configs"})
