"""A leaner launch for hot Triton kernels: after the first call compiles a specialization,
later calls with the same specialization go straight to the compiled kernel's launcher.

`fn[grid](...)` re-binds every argument, recomputes Triton's specialization key and looks the
kernel up on each call: about 40 us of host time per launch on the device machine's host,
against 13 us for the compiled kernel's own launcher (scratch probe, 2026-11-25). For the
linear scan the host time of an eager forward + backward exceeded its GPU time at small and
mid sizes. The key here is the part of Triton's specialization that can change between calls
of one kernel: each tensor's dtype and 16-byte alignment, each integer's width, divisibility
by 16 and equality to 1, each host TMA descriptor's dtype, box and layout, and the constexpr
values; anything else (the interpreter, launch
hooks set by a profiler such as Proton) takes Triton's own path.
"""

from __future__ import annotations

import torch
from triton import knobs as triton_knobs

from .config import knobs

_UNKNOWN = object()


def _spec(value):
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() % 16 == 0
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return -(2**31) <= value < 2**31, value == 1, value % 16 == 0
    if isinstance(value, float):  # fp32, never specialized
        return float
    if _descriptor(value):  # a host TMA descriptor: Triton keys its type (dtype, box, layout)
        layout = getattr(value, "layout", None)
        return "desc", value.base.dtype, tuple(value.block_shape), layout, getattr(value, "padding", None)
    return _UNKNOWN  # another object: Triton's own path


def _descriptor(value) -> bool:
    """A host-side TMA descriptor (triton.tools.tensor_descriptor's or Gluon's TensorDescriptor),
    which the compiled kernel's launcher encodes itself on every launch."""
    return type(value).__name__ == "TensorDescriptor" and isinstance(getattr(value, "base", None), torch.Tensor)


def _hooked(hook) -> bool:
    """A launch hook is set: a callable, or (Triton >= 3.5) a HookChain with calls in it."""
    return hook is not None and bool(getattr(hook, "calls", True))


class Launcher:
    """`Launcher(kernel)(grid, *args, num_warps=w, num_stages=s, maxnreg=r, **named)` launches
    `kernel` as `kernel[grid](*args, **named, num_warps=w, num_stages=s, maxnreg=r)` would: grid a
    tuple of 1-3 ints, the remaining parameters (constexprs included) by name or by their
    defaults; maxnreg (a register cap per thread, so more programs share an SM) only when set;
    launch_pdl (programmatic dependent launch: the kernel may start before the previous one on
    its stream ends, and waits for it with `griddepcontrol.wait`) a compile option, keyed."""

    def __init__(self, fn):
        self.fn = fn
        self.names = list(fn.arg_names)
        params = getattr(fn, "params", [])
        # Constexprs enter the key by value; other arguments by their specialization.
        self.by_value = [p.is_constexpr for p in params]
        # Integers marked do_not_specialize (e.g. a tag that changes every launch) enter the
        # key by width only, as in Triton's own key: one compiled kernel serves every value.
        self.unspecialized = [getattr(p, "do_not_specialize", False) for p in params]
        self.defaults = [p.default for p in params]
        self.compiled: dict[tuple, object] = {}
        self.direct_calls = 0  # calls that took this path (tests check it is taken)
        self.bound_calls = 0  # of those, launches through a `Bound` (tests check those too)

    def __call__(
        self, grid: tuple, *args, num_warps: int = 4, num_stages: int | None = None, maxnreg: int | None = None,
        launch_pdl: bool = False, **named,
    ):  # fmt: skip
        options = {"num_warps": num_warps, "num_stages": num_stages, "maxnreg": maxnreg}
        options = {k: v for k, v in options.items() if v is not None} | ({"launch_pdl": True} if launch_pdl else {})
        keyed = self._key(args, named, (num_warps, num_stages, maxnreg, launch_pdl))
        kernel = self.compiled.get(keyed[0]) if keyed is not None else None
        if kernel is None:  # Triton's own path: compiles (or finds in its cache) and launches
            compiled = self.fn[grid](*args, **named, **options)
            if keyed is not None:
                self.compiled[keyed[0]] = compiled
            return
        key, full = keyed
        grid = (*grid, 1, 1)
        stream = torch._C._cuda_getCurrentRawStream(key[0])
        kernel.run(grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata, None, None, None, *full)

    def bind(
        self, heads: int, grid: tuple, *args, num_warps: int = 4, num_stages: int | None = None,
        maxnreg: int | None = None, launch_pdl: bool = False, **named,
    ) -> Bound | None:  # fmt: skip
        """After a call with these arguments has compiled their specialization: that kernel with
        `grid` and every argument past the first `heads` fixed as given here, for a caller that
        launches one configuration many times (`Bound(*head_args)`). None where only Triton's own
        path will do, or before the first call. The caller's own key must guarantee that every
        later call's head arguments specialize as these do (dtype, 16-byte alignment, descriptor
        type): the bound launch checks nothing, which is what makes it cheap."""
        keyed = self._key(args, named, (num_warps, num_stages, maxnreg, launch_pdl), count=False)
        kernel = self.compiled.get(keyed[0]) if keyed is not None else None
        if kernel is None:
            return None
        return Bound(self, kernel, (*grid, 1, 1)[:3], keyed[1][heads:], keyed[0][0])

    def _key(self, args, named, options: tuple, count=True) -> tuple[tuple, list] | None:
        """(the specialization key, every argument in signature order), or None where only
        Triton's own path will do (the interpreter, CPU tensors, a launch hook, an argument
        that cannot be keyed)."""
        hooks = triton_knobs.runtime.launch_enter_hook, triton_knobs.runtime.launch_exit_hook
        first = args[0].base if _descriptor(args[0]) else args[0]
        if knobs.interpret or not first.is_cuda or any(map(_hooked, hooks)):
            return None
        full = list(args)
        for i in range(len(args), len(self.names)):
            full.append(named[self.names[i]] if self.names[i] in named else self.defaults[i])
        spec = [
            v if const else (-(2**31) <= v < 2**31) if plain and isinstance(v, int) else _spec(v)
            for v, const, plain in zip(full, self.by_value, self.unspecialized, strict=True)
        ]
        if _UNKNOWN in spec:
            return None
        self.direct_calls += count
        # The current device: where Triton compiles and launches.
        return (torch.cuda.current_device(), *options, *spec), full


class Bound:
    """One compiled kernel, grid and argument tail (`Launcher.bind`): a call passes the head
    arguments and launches on the current stream, about 10 us of host time less than the keyed
    path on the device machine's host. Returns False, launching nothing, while a launch hook is
    set (a profiler): the caller then takes the keyed path, which gives hooks their due."""

    __slots__ = ("device", "grid", "kernel", "launcher", "tail")

    def __init__(self, launcher: Launcher, kernel, grid: tuple, tail: list, device: int):
        self.launcher, self.kernel, self.grid, self.tail, self.device = launcher, kernel, grid, tail, device

    def __call__(self, *head) -> bool:
        runtime = triton_knobs.runtime
        if _hooked(runtime.launch_enter_hook) or _hooked(runtime.launch_exit_hook):
            return False
        kernel = self.kernel
        stream = torch._C._cuda_getCurrentRawStream(self.device)
        kernel.run(*self.grid, stream, kernel.function, kernel.packed_metadata, None, None, None, *head, *self.tail)
        self.launcher.direct_calls += 1
        self.launcher.bound_calls += 1
        return True
