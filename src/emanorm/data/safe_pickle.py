"""Unpickling data files without running code: only plain containers and numpy arrays are admitted.

A pickle is a program: every global it names is imported and may be called while it loads, so a
``data_batch_1`` whose ``__reduce__`` names ``os.system`` runs a shell command. Data archives (the
CIFAR python batches) hold only dicts, lists, bytes, str, int and numpy arrays, which need no
global but the few numpy uses to rebuild an array; :class:`DataUnpickler` resolves those and
refuses every other one before anything is called (the "Restricting Globals" recipe of the
``pickle`` documentation).
"""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

_SAMPLE = np.zeros(1, dtype=np.uint8)
# numpy's own array rebuilders, taken from its reducers so no private module is imported by name.
_RECONSTRUCT = _SAMPLE.__reduce__()[0]  # protocols 0-4
_FROMBUFFER = _SAMPLE.__reduce_ex__(5)[0]  # protocol 5


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """What protocol 2 under Python 3 writes for ``bytes``: ``_codecs.encode(text, 'latin1')``."""
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} (only latin1 spells bytes)")
    return codecs.encode(text, "latin1")


ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    # numpy 1.x and Python 2 pickles (the official CIFAR archive) say numpy.core, numpy 2 numpy._core
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}
ADMITTED = "dicts, lists, tuples, bytes, str, numbers and numpy arrays"


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a global outside :data:`ALLOWED_GLOBALS`; nothing of it was called."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.qualified_name = f"{module}.{name}"


class DataUnpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` that resolves only :data:`ALLOWED_GLOBALS` and no persistent ids."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise RefusedGlobal(module, name) from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not data")


def load_data_pickle(file: BinaryIO | str | Path, *, encoding: str = "latin1") -> Any:
    """Unpickle a data file (``encoding`` as in ``pickle.load``; latin1 reads Python 2 pickles).

    Raises :class:`RefusedGlobal` for any global but numpy's array rebuilders, before calling it;
    other malformed input raises what ``pickle.load`` raises.
    """
    if isinstance(file, (str, Path)):
        with open(file, "rb") as fh:
            return DataUnpickler(fh, encoding=encoding).load()
    return DataUnpickler(file, encoding=encoding).load()
