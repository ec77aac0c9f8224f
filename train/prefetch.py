"""Host-to-device copies of a step's microbatches from pinned memory, on a side stream (CUDA; no-op on CPU).

The trainer hands the loader's (host) microbatches to `DevicePrefetcher.to_device` before the engine step:
every tensor is put in page-locked memory (unless the loader already did) and copied with non_blocking=True on
a copy stream, so the host never waits for a copy (a pageable copy is synchronous) and the copies run while
the GPU is still executing what the host queued before (the previous step's optimizer kernels). The compute
stream waits for the copies with one event, and the device tensors are marked as used by it
(record_stream), so the caching allocator cannot hand their memory to another stream too early.

The loader is not read ahead: the microbatches copied are the ones this step trains on, so the loader
position saved in a checkpoint stays exact.
"""

from __future__ import annotations

import torch

from core.batch import PackedBatch


def _tensors(mb: PackedBatch) -> list[torch.Tensor]:
    """The tensors that go to the device (the grids stay on the host: core.batch.HOST_FIELDS; the host-built
    model inputs in `prepared` go)."""
    out: list[torch.Tensor] = []

    def keep(t: torch.Tensor) -> torch.Tensor:
        out.append(t)
        return t

    mb.map_device_tensors(keep)
    return out


class DevicePrefetcher:
    """Copies microbatches to `device` asynchronously (CUDA); returns them unchanged on other devices."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.copied_bytes = 0
        """Bytes copied to the device so far (a check that the path is used)."""

    def _copy(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "cpu" and not t.is_pinned():
            t = t.pin_memory()
        self.copied_bytes += t.numel() * t.element_size()
        return t.to(self.device, non_blocking=True)

    def to_device(self, mbs: list[PackedBatch] | None) -> list[PackedBatch] | None:
        """The microbatches with every tensor on the device. The copies may still be in flight: work queued on
        the current stream after this call sees them complete."""
        if mbs is None or self.stream is None:
            return mbs
        compute = torch.cuda.current_stream(self.device)
        # The copy stream must not overwrite memory the compute stream still reads (a freed buffer reused).
        self.stream.wait_stream(compute)
        out = []
        with torch.cuda.stream(self.stream):
            for mb in mbs:
                mb.num_supervised  # noqa: B018 - counted on the host before the labels move
                out.append(mb.map_device_tensors(self._copy))
        compute.wait_stream(self.stream)
        for mb in out:
            for t in _tensors(mb):
                t.record_stream(compute)
        return out
