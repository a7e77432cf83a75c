"""Errors shown to users as one line, with the fix."""


class UserError(Exception):
    """A problem with the user's input; the message says what is wrong and how to fix it."""


def check_device(device: str) -> str:
    """``device`` if torch can run on it here, else a UserError naming the fix (no CUDA traceback from deep inside)."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UserError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from e  # e.g. "gpu", "cuda:x"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device!r}: this torch {torch.__version__} sees no CUDA GPU; use --device cpu, "
                            "or install a CUDA build of torch on a machine with a GPU")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                            f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {device!r}: this machine has no Apple GPU; use --device cpu")
    return device
