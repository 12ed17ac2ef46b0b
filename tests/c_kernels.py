"""The skip marker of tests that build moekit's C decode code (glue, layers, blocks)."""

from __future__ import annotations

import os
import shutil

import pytest


def why_no_c_kernels() -> str | None:
    """Why the C decode code cannot run here (None when it can)."""
    if os.environ.get("MOEKIT_NO_KERNELS"):
        return "MOEKIT_NO_KERNELS is set: the C decode code is off"
    if not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")):
        return "no C compiler here to build the C decode code"
    return None


needs_c_kernels = pytest.mark.skipif(why_no_c_kernels() is not None, reason=str(why_no_c_kernels()))
