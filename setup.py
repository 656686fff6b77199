"""
Setuptools shim: the project's metadata and package list live in pyproject.toml, so
``pip install -e .`` and ``python setup.py ...`` (older tooling) build the same thing.
"""
from setuptools import setup

setup()
