"""Reusable scratch buffers for the full-size passes of the selectors.

On a CPU a fresh multi-MiB tensor is handed out by ``mmap`` or a trimmed heap, and every one of its
pages faults on first touch: at the paper's pseudo-label size (2.4 M pixels) the page faults of a
handful of temporaries cost as much as the arithmetic. A stateful primitive (a selector) therefore
keeps its temporaries in named buffers that it reuses from call to call. On CUDA the caching
allocator already reuses memory, so there the buffers are plain ``torch.empty`` tensors.

The buffers are internal: nothing handed back to a caller ever aliases them. They are not part of
``state_dict`` and are dropped when the owner is pickled or deep-copied.
"""

from __future__ import annotations

import torch


class Scratch:
    """Grow-only named scratch memory for one owner (not thread-safe, like the module owning it).

    >>> s = Scratch()
    >>> a = s.get("a", 10, torch.int32, torch.device("cpu"))
    >>> b = s.get("b", 4, torch.bool, torch.device("cpu"))
    >>> a.shape, b.dtype, s.nbytes
    (torch.Size([10]), torch.bool, 44)
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        """Bytes held (0 after :meth:`release`)."""
        return sum(t.numel() * t.element_size() for t in self._buffers.values())

    def release(self) -> None:
        """Free the buffers (they are re-created on the next use)."""
        self._buffers.clear()

    def get(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised 1-D tensor of ``numel`` elements; the same memory on every call with
        the same ``name`` (and a CPU device), so two names in use at once never alias."""
        if device.type != "cpu":
            return torch.empty(numel, dtype=dtype, device=device)
        buf = self._buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < numel:
            self._buffers.pop(name, None)  # free the old buffer before allocating the new one
            buf = self._buffers[name] = torch.empty(numel, dtype=dtype)
        return buf[:numel]

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def __deepcopy__(self, memo: dict) -> Scratch:
        return Scratch()
