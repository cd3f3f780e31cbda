"""The one device choice every command makes: `--device` (auto, cpu, cuda, cuda:N, mps, ...) -> a device.

Written once so that `eval`, `report`, `ask`, `serve` and `tag` (and the trainers) agree on the default and
refuse the same mistakes with the same one-line `UsageError` (exit code 2) instead of a torch traceback
deep inside model loading.
"""

from __future__ import annotations

from gpt2mm.errors import UsageError


def pick_device(device: str | None = None, flag: str = "--device") -> str:
    """The requested device as given, or for None / "auto" cuda when there is one, else cpu (evaluation on
    CPU is slow but must work). A name torch does not know, or a device this machine lacks, is a
    `UsageError` naming `flag`. Returns the name (a string, as written into results and logs);
    `torch.device(pick_device(...))` where a device object is wanted."""
    import torch

    if not device or device.lower() == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"{flag} {device}: not a device name (expected cpu, cuda, cuda:N or mps)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{flag} {device}: CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise UsageError(
                f"{flag} {device}: this machine has {count} CUDA device(s): cuda:0 to cuda:{count - 1}"
            )
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"{flag} {device}: MPS is not available on this machine")
    return device
