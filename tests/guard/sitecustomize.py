"""Installs the reads guard in every Python process a test starts (this folder is on their PYTHONPATH)."""

import importlib.util
import os
import sys

import reads_guard

reads_guard.install_from_env()

# Another sitecustomize further down the path (a distribution's) still runs, as it would without this one.
_here = os.path.dirname(os.path.abspath(__file__))
for _folder in sys.path:
    _path = os.path.join(_folder or ".", "sitecustomize.py")
    if os.path.abspath(_folder or ".") != _here and os.path.isfile(_path):
        _spec = importlib.util.spec_from_file_location("_next_sitecustomize", _path)
        _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
        break
