"""python benchmarks/sync_count.py [--json OUT]   # one training step of the tiny recipe: its host syncs, on CPU

Counts, without a GPU, the operations of one training step that would make the host wait for a CUDA device
(issue 19, "a step with no host syncs"), each with the line of this project's code it comes from, and prints
them as a table. The GPU count of the same thing is the suite's a_profile part (torch.cuda.set_sync_debug_mode).

How a CPU run shows what a GPU run would do: the step runs on an emulated device, `cpu:0`. Tensors carry no
device index on CPU, so the counter (HostSyncCounter) keeps the device side itself: the model's parameters,
gradients and buffers, the microbatches the prefetcher hands over (copied here, as its pinned non-blocking
copies would be), anything made by a factory with `device=cpu:0`, and every result of an op with a device
input are device tensors; everything else is host. `.device` of a device tensor reads `cpu:0`, so code that
follows a tensor's device (`torch.arange(n, device=x.device)`) builds on the right side. Counted as syncs:

  item             .item(), float(t), int(t), bool(t) (`if t:`) of a device tensor
  tolist / numpy   .tolist(), .numpy(), np.asarray() of a device tensor
  device-to-host   .cpu(), .to('cpu'), host.copy_(device) (a non-blocking .to('cpu') is not counted)
  host-to-device   a copy of pageable host memory to the device: .to(device), device.copy_(host),
                   torch.tensor(data, device=...) (a pinned source with non_blocking=True is not counted)
  data-dependent   ops whose output size depends on device values: nonzero / argwhere / where(c),
                   masked_select, boolean-mask indexing and assignment, unique, repeat_interleave without
                   output_size, bincount, equal

It does not see what a GPU adds on its own (cudaMalloc when the caching allocator grows, cuBLAS or NCCL
set-up, a kernel that syncs internally): the GPU count is the authority; this one is the CI check.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import traceback
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / "benchmarks")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

EMULATED_DEVICE = torch.device("cpu", 0)
"""The device the counted step runs on: CPU memory, but a device of its own to the counter."""

_aten = torch.ops.aten
_DATA_DEPENDENT = {
    _aten.nonzero.default: "nonzero", _aten.masked_select.default: "masked_select",
    _aten._unique2.default: "unique", _aten.unique_dim.default: "unique", _aten.unique_consecutive.default: "unique",
    _aten._unique.default: "unique", _aten.bincount.default: "bincount", _aten.equal.default: "equal",
}
_BOOL_INDEXED = {_aten.index.Tensor, _aten.index_put_.default, _aten.index_put.default, _aten._index_put_impl_.default}


@dataclass
class SyncEvent:
    kind: str
    where: str


@dataclass
class SyncReport:
    """The syncs one counted call made, in order."""

    events: list[SyncEvent] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.events)

    def by_site(self) -> list[tuple[str, str, int]]:
        """(kind, where, n), most frequent first."""
        c = Counter((e.kind, e.where) for e in self.events)
        return [(k, w, n) for (k, w), n in sorted(c.items(), key=lambda x: (-x[1], x[0][1], x[0][0]))]

    def table(self) -> str:
        rows = self.by_site()
        width = max([len(w) for _, w, _ in rows] + [5])
        lines = [f"{'n':>3}  {'kind':<16} where", f"{'-' * 3}  {'-' * 16} {'-' * width}"]
        lines += [f"{n:>3}  {k:<16} {w}" for k, w, n in rows]
        lines.append(f"{self.count:>3}  in all")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"count": self.count, "sites": [{"kind": k, "where": w, "n": n} for k, w, n in self.by_site()]}


def _written(func, args, kwargs) -> list[torch.Tensor]:
    """The tensors an op writes into (its schema's mutable arguments: self of an in-place op, out=, lists)."""
    out = []
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            v = kwargs.get(a.name) if a.kwarg_only or i >= len(args) else args[i]
            out += [t for t in tree_flatten(v)[0] if isinstance(t, torch.Tensor)]
    return out


def _where() -> str:
    """The innermost frame of this project's code (outside this file) that led here, as 'path:line function'."""
    here = Path(__file__).resolve()
    for fr in reversed(traceback.extract_stack()):
        path = Path(fr.filename).resolve()
        if path != here and ROOT in path.parents and "site-packages" not in path.parts:
            return f"{path.relative_to(ROOT)}:{fr.lineno} {fr.name}"
    return "?"


class HostSyncCounter(TorchDispatchMode):
    """Counts host-device syncs of the code run inside `with counter:` on an emulated device (module doc)."""

    def __init__(self, device: torch.device = EMULATED_DEVICE) -> None:
        super().__init__()
        self.device = device
        self.report = SyncReport()
        self._dev: dict[int, weakref.ref] = {}
        self._stor: dict[int, Any] = {}
        self._patches: list[Any] = []
        self._quiet = 0

    # ---------------------------------------------------------------- the device side
    # Kept per storage, not per Python tensor: an op's result inside a C++ composite (reshape = clone +
    # _unsafe_view) reaches the mode again under a new Python object, and views, or buffers written through
    # another view (FSDP2's reduce-scatter input), share their storage. The counter holds each device storage
    # until it exits, so no storage id is reused meanwhile (fine for the small steps it counts).
    @staticmethod
    def _storage(t: torch.Tensor) -> Any:
        try:
            return t.untyped_storage()
        except Exception:  # noqa: BLE001 - wrapper subclasses (DTensor) have no storage of their own
            return None

    def is_device(self, t: Any) -> bool:
        if not isinstance(t, torch.Tensor):
            return False
        r = self._dev.get(id(t))
        if r is not None and r() is t:
            return True
        st = self._storage(t)
        return st is not None and st._cdata in self._stor

    def mark_device(self, *tensors: Any) -> None:
        """Put tensors on the device side (parameters, gradients, state made before the count began)."""
        for t in tensors:
            if isinstance(t, torch.Tensor) and not self.is_device(t):
                st = self._storage(t)
                if st is not None:
                    self._stor[st._cdata] = st
                else:
                    key = id(t)
                    self._dev[key] = weakref.ref(t, lambda _r, k=key: self._dev.pop(k, None))
                local = getattr(t, "_local_tensor", None)  # a DTensor's shard is on the device too
                if local is not None:
                    self.mark_device(local)

    def unmark(self, t: torch.Tensor) -> None:
        self._dev.pop(id(t), None)
        st = self._storage(t)
        if st is not None:
            self._stor.pop(st._cdata, None)

    def mark_module(self, *modules: torch.nn.Module) -> None:
        for m in modules:
            for p in m.parameters():
                self.mark_device(p, p.grad)
            for b in m.buffers():
                self.mark_device(b)

    def mark_reachable(self, obj: Any, depth: int = 4, _seen: set[int] | None = None) -> None:
        """Every tensor reachable from obj's attributes, lists and dicts (depth levels): an FSDP2 unit's
        unsharded parameters and communication buffers, made before the count began."""
        seen = _seen if _seen is not None else set()
        if depth < 0 or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            self.mark_device(obj)
            return
        if isinstance(obj, dict):
            items = obj.values()
        elif isinstance(obj, (list, tuple)):
            items = obj
        elif type(obj).__module__.startswith("torch.distributed.fsdp") and hasattr(obj, "__dict__"):
            items = vars(obj).values()
        else:
            return
        for v in items:
            self.mark_reachable(v, depth - 1, seen)

    def mark_optimizer(self, opt: torch.optim.Optimizer | None) -> None:
        """Optimizer state on the device side, except scalar step counters (host tensors unless fused)."""
        for st in (opt.state.values() if opt is not None else []):
            self.mark_device(*(v for k, v in st.items() if k != "step"))

    def _record(self, kind: str) -> None:
        if not self._quiet:
            self.report.events.append(SyncEvent(kind, _where()))

    # ---------------------------------------------------------------- dispatch
    def _is_emulated(self, device: Any) -> bool:
        return device is not None and torch.device(device) == self.device

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        on_dev = any(self.is_device(t) for t in flat)
        kind = self._sync_kind(func, args, kwargs, on_dev)
        out = func(*args, **kwargs)
        if kind:
            self._record(kind)
        to_dev = self._is_emulated(kwargs.get("device"))
        host_out = func in (_aten._to_copy.default,) and not to_dev and kwargs.get("device") is not None
        if (on_dev or to_dev) and not host_out:
            self.mark_device(*(t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)))
            if kind != "device-to-host":  # an in-place or out= op that writes device values: device memory
                self.mark_device(*_written(func, args, kwargs))
        return out

    def _sync_kind(self, func, args, kwargs, on_dev: bool) -> str | None:
        if func is _aten._to_copy.default:
            src, dst = args[0], kwargs.get("device")
            if self._is_emulated(dst) and not self.is_device(src):
                pinned = kwargs.get("non_blocking", False) and src.is_pinned()
                return None if pinned else "host-to-device"
            if dst is not None and not self._is_emulated(dst) and self.is_device(src):
                return None if kwargs.get("non_blocking", False) else "device-to-host"
            return None
        if func is _aten.copy_.default:
            dst, src = args[0], args[1]
            if self.is_device(dst) and not self.is_device(src):
                return None if (len(args) > 2 and args[2] and src.is_pinned()) else "host-to-device"
            if self.is_device(src) and not self.is_device(dst):
                return "device-to-host"
            return None
        if not on_dev:
            return None
        if func is _aten._local_scalar_dense.default:
            return "item"
        if func in _DATA_DEPENDENT:
            return "data-dependent"
        if func is _aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            return "data-dependent"
        if func in _BOOL_INDEXED:
            idx = args[1] if len(args) > 1 else []
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in idx or []):
                return "data-dependent"
        return None

    # ---------------------------------------------------------------- what dispatch does not see
    def _patch(self, owner: Any, name: str, make: Callable[[Callable], Callable]) -> None:
        had = name in vars(owner)
        orig = getattr(owner, name)
        setattr(owner, name, make(orig))
        self._patches.append((owner, name, orig, had))

    def _install(self) -> None:
        counter = self
        base_device = torch._C.TensorBase.device

        def device_of(t: torch.Tensor) -> torch.device:
            return counter.device if counter.is_device(t) else base_device.__get__(t)

        self._patch(torch.Tensor, "device", lambda _orig: property(device_of))

        def reader(kind: str):
            def make(orig):
                def wrapped(t, *a, **kw):
                    if counter.is_device(t):
                        counter._record(kind)
                    counter._quiet += 1  # np.asarray -> __array__ -> numpy(): one read
                    try:
                        return orig(t, *a, **kw)
                    finally:
                        counter._quiet -= 1
                return wrapped
            return make

        for name in ("tolist", "numpy", "__array__"):
            self._patch(torch.Tensor, name, reader("tolist / numpy"))

        def host_copy(t: torch.Tensor, non_blocking: bool) -> torch.Tensor:
            if not non_blocking:
                counter._record("device-to-host")
            counter._quiet += 1
            try:
                out = t.detach().clone() if not t.requires_grad else t.clone()
            finally:
                counter._quiet -= 1
            counter.unmark(out)
            return out

        def make_cpu(orig):
            def cpu(t, *a, **kw):
                return host_copy(t, False) if counter.is_device(t) else orig(t, *a, **kw)
            return cpu

        def make_to(orig):
            def to(t, *a, **kw):
                if counter.is_device(t):
                    dev, dtype, non_blocking, _ = torch._C._nn._parse_to(*a, **kw)
                    if dev is not None and dev.type == "cpu" and not counter._is_emulated(dev):
                        out = host_copy(t, non_blocking)
                        return out if dtype is None else orig(out, dtype)
                return orig(t, *a, **kw)
            return to

        self._patch(torch.Tensor, "cpu", make_cpu)
        self._patch(torch.Tensor, "to", make_to)

        def make_factory(orig):
            def factory(data, *a, device=None, **kw):
                if counter._is_emulated(device):
                    counter._record("host-to-device")  # built on the host, copied from pageable memory
                    out = orig(data, *a, **kw)
                    counter.mark_device(out)
                    return out
                return orig(data, *a, device=device, **kw)
            return factory

        self._patch(torch, "tensor", make_factory)
        self._patch(torch, "as_tensor", make_factory)

    def _uninstall(self) -> None:
        while self._patches:
            owner, name, orig, had = self._patches.pop()
            if had:
                setattr(owner, name, orig)
            else:
                delattr(owner, name)

    def __enter__(self) -> HostSyncCounter:
        self._install()
        try:
            return super().__enter__()
        except BaseException:
            self._uninstall()
            raise

    def __exit__(self, *exc) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self._uninstall()
            self._stor.clear()


# ------------------------------------------------------------------------------------------ one training step
@contextlib.contextmanager
def emulated_trainer(steps_before: int = 1, optimizer: str = "fused") -> Iterator[Any]:
    """A train.trainer.Trainer of the golden tiny recipe (benchmarks/tiny_corpus.py: generated corpus, tiny
    model, 2 microbatches a step) built on EMULATED_DEVICE, after `steps_before` uncounted steps. `optimizer`:
    optim.implementation, 'fused' as on a GPU (the skip decided in its kernel), or 'foreach' (one read of the skip
    flag per step)."""
    from tiny_corpus import golden_recipe, make_tiny_corpus

    import parallel.dims as dims_mod
    from parallel import destroy_distributed
    from train.config import config_from_dict
    from train.trainer import Trainer

    destroy_distributed()  # a process group left by an earlier user would keep its device (not the emulated one)
    with tempfile.TemporaryDirectory() as tmp:
        raw = golden_recipe(make_tiny_corpus(Path(tmp) / "corpus"), Path(tmp) / "run", "cpu")
        raw.setdefault("optim", {})["implementation"] = optimizer
        cfg = config_from_dict(raw)
        trainer = None
        try:
            with mock.patch.object(dims_mod, "_pick_device", lambda cfg, local_rank: EMULATED_DEVICE):
                trainer = Trainer(cfg)
            _fsdp_on(trainer.engine.modules, EMULATED_DEVICE)
            for _ in range(steps_before):
                trainer.train_step()
            yield trainer
        finally:
            if trainer is not None:
                trainer.close()
            destroy_distributed()


def _fsdp_on(modules: list[torch.nn.Module], device: torch.device) -> None:
    """Give FSDP2's units the emulated device, where they allocate their all-gather and reduce-scatter buffers
    (FSDP2 takes a CPU mesh's device as plain 'cpu' and checks the parameters against it while it is built, so
    it is set afterwards; these are FSDP2's own attributes, read on every step)."""
    from torch.distributed.fsdp import FSDPModule

    for root in modules:
        for m in root.modules():
            if isinstance(m, FSDPModule):
                state = m._get_fsdp_state()
                state._device = device
                group = state._fsdp_param_group
                if group is not None:
                    group.device = device
                    for fp in group.fsdp_params:
                        fp.device = device


def _copies_to_device(counter: HostSyncCounter) -> Callable[[list | None], list | None]:
    """The prefetcher's hand-over as on a GPU: a device copy of each tensor that goes (pinned, non-blocking: no
    sync), the host batches kept for the host-side FLOP count."""

    def copy(t: torch.Tensor) -> torch.Tensor:
        counter._quiet += 1
        try:
            out = t.clone()
        finally:
            counter._quiet -= 1
        counter.mark_device(out)
        return out

    def to_device(mbs):
        if mbs is None:
            return None
        for mb in mbs:
            mb.num_supervised  # noqa: B018 - counted on the host first, as the prefetcher does
        return [mb.map_device_tensors(copy) for mb in mbs]

    return to_device


def _accelerator_sdpa(q_THDh, k_THkvDh, v_THkvDh, cu_seqlens, causal: bool, scale: float | None) -> torch.Tensor:
    """What model.attention's SDPA backend runs on a GPU (one call with a block-diagonal mask): it picks its
    per-segment loop, which reads cu_seqlens on the host, by the device type, and the emulated device is a CPU."""
    from model.attention import sdpa_block_mask

    return sdpa_block_mask(q_THDh, k_THkvDh, v_THkvDh, cu_seqlens, causal=causal, scale=scale)


def count_step(trainer: Any, extra_device: Iterable[torch.Tensor] = ()) -> tuple[SyncReport, Any]:
    """One trainer.train_step() under a HostSyncCounter: (its syncs, the step's StepStats)."""
    from torch.distributed.fsdp import FSDPModule

    import model.attention as attention

    counter = HostSyncCounter(trainer.device)
    for m in trainer.engine.modules:
        counter.mark_module(m)
        for unit in m.modules():
            if isinstance(unit, FSDPModule):
                counter.mark_reachable(unit._get_fsdp_state()._fsdp_param_group)
    counter.mark_optimizer(trainer.optimizer)
    counter.mark_device(*extra_device)
    with mock.patch.object(trainer.prefetcher, "to_device", _copies_to_device(counter)), \
            mock.patch.object(attention, "_sdpa", _accelerator_sdpa), counter:
        st = trainer.train_step()
    st.loss, st.grad_norm = float(st.loss_t), float(st.grad_norm_t)  # read after the count, as the loop would
    return counter.report, st


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=None, help="also write the count and sites here")
    ap.add_argument("--optimizer", choices=("fused", "foreach"), default="fused",
                    help="optim.implementation: fused (a GPU's default) or foreach")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    with emulated_trainer(optimizer=a.optimizer) as trainer:
        rep, st = count_step(trainer)
    print(f"host-device syncs in one training step of the tiny recipe (2 microbatches, {a.optimizer} AdamW; "
          f"loss {st.loss:.6f}), counted on CPU (benchmarks/sync_count.py):\n")
    print(rep.table())
    if a.json:
        a.json.write_text(json.dumps(rep.as_dict(), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
