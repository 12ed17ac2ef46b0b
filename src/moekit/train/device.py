"""The device a run trains on (`train.device`), checked against this machine before anything is
read or written: a config names a device any machine may lack (a run trained on a GPU still
loads on a laptop), so the check is the trainer's, not the config's."""

from __future__ import annotations

import torch


def available_devices() -> list[str]:
    """The `train.device` values this machine can train on."""
    devices = ["auto", "cpu"]
    if torch.cuda.is_available():
        devices += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    if torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def training_device(spec: str) -> torch.device:
    """The torch device of `train.device` = `spec` ("auto": cuda when available, else cpu);
    ValueError naming train.device and the devices available here if this machine lacks it."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec not in available_devices():
        raise ValueError(
            f"train.device={spec!r} is not available here: {_missing(spec)}; use one of "
            f"{', '.join(available_devices())}"
        )
    return torch.device(spec)


def _missing(spec: str) -> str:
    """Why this machine lacks the device `spec`."""
    if spec.startswith("cuda"):
        if not torch.backends.cuda.is_built():
            return f"this torch ({torch.__version__}) is built without CUDA"
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return "no CUDA device is visible"
        ids = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
        return f"this machine has {count} CUDA device{'s' if count > 1 else ''} ({ids})"
    if spec == "mps":
        if not torch.backends.mps.is_built():
            return f"this torch ({torch.__version__}) is built without MPS (Apple silicon's GPU)"
        return "no MPS device is available (it needs macOS 12.3+ on Apple silicon)"
    return "it is not a device torch knows"  # TrainConfig.check already refuses other names
