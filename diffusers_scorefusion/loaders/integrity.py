"""Checksums of saved files, and clear errors for weight files that could only be read by running code."""

import hashlib
import os
import pickle
import re
from typing import Callable, Dict, Iterable, Optional

# File names that hold weights (a folder may not gain one its save did not record).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack", ".h5", ".index.json")
CHUNK_BYTES = 16 * 1024 * 1024


def sha256_file(path: str) -> str:
    """The sha256 of a file (hex), read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def folder_digests(folder: str) -> Dict[str, str]:
    """`{file name: sha256}` of every file at the top of `folder` (what a save records)."""
    names = sorted(name for name in os.listdir(folder) if os.path.isfile(os.path.join(folder, name)))
    return {name: sha256_file(os.path.join(folder, name)) for name in names}


def verify_digests(
    recorded: Dict[str, str], resolve: Callable[[str], str], where: str, listing: Optional[Iterable[str]] = None
) -> None:
    r"""
    Compares files with the sha256 recorded at save time; raises a `ValueError` naming the first that differs.

    Args:
        recorded (`dict[str, str]`): `{file name: sha256}` from the fusion config.
        resolve (`Callable[[str], str]`): the local path of a file name (downloading it from the Hub if needed).
        where (`str`): the folder, for messages.
        listing (`Iterable[str]`, *optional*): the files the folder holds now (local folders); a weight file that
            the save did not record is refused too, since loaders would read it.
    """
    for name, expected in recorded.items():
        try:
            path = resolve(name)
        except (OSError, ValueError) as error:
            raise ValueError(f"{where}: the saved file {name!r} is missing ({error})") from error
        actual = sha256_file(path)
        if actual != expected:
            raise ValueError(
                f"{where}: {name} does not match the sha256 recorded when it was saved (recorded {expected[:16]}..., "
                f"found {actual[:16]}...): the file was changed or damaged after saving"
            )
    if listing is not None:
        extra = sorted(name for name in listing if name.endswith(WEIGHT_SUFFIXES) and name not in recorded)
        if extra:
            raise ValueError(f"{where} holds weight files the save did not record: {extra}")


class UnpicklingRefusedError(OSError):
    """A weight file that only full unpickling could read (which can run code) was refused."""


def needs_unpickling(error: BaseException) -> bool:
    """True when `error` (or what caused it) is torch's `weights_only=True` loader refusing a pickled object."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, UnpicklingRefusedError):
            return False  # already said
        if isinstance(error, pickle.UnpicklingError):
            return True
        error = error.__cause__ or error.__context__
    return False


def unpickling_refused(error: BaseException, where: str) -> UnpicklingRefusedError:
    """The error to raise instead of `error` when a `.bin` file would need full unpickling (see `needs_unpickling`)."""
    messages = []
    cause: Optional[BaseException] = error
    while cause is not None and len(messages) < 10:
        messages.append(str(cause))
        cause = cause.__cause__ or cause.__context__
    files = sorted(set(re.findall(r"[^\s'\"]+\.(?:bin|pt|pth|ckpt)\b", " ".join(messages))))
    named = f" ({', '.join(files)})" if files else ""
    return UnpicklingRefusedError(
        f"{where}: a pickle weight file{named} holds Python objects other than tensors, which only full unpickling "
        "could read, and unpickling can run code: refused. Weights load from safetensors, or from .bin files through "
        "torch.load(weights_only=True); convert this file to safetensors where you trust it."
    )
