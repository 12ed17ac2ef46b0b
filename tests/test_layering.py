"""The model is plain PyTorch: importing it loads no data, training or plotting code (the static
rules are import-linter's contracts in pyproject.toml, run by `make test`)."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_model_loads_no_data_training_or_plotting_code() -> None:
    code = (
        "import sys, moekit.model, moekit.moe\n"
        "loaded = [m for m in sys.modules if m.split('.')[:2] in "
        "(['moekit', 'data'], ['moekit', 'train'], ['moekit', 'distributed']) "
        "or m.split('.')[0] == 'matplotlib']\n"
        "print(','.join(loaded))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
