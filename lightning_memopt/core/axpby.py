"""``d ← b·d + a·clamp(u)`` in place, one pass, skipped on the device when a flag says so.

The in-backward methods apply each gradient with this (LOMO's SGD step, AdaLomo's final step), so a step whose loss
was not finite leaves the weights bit-identical without a host sync: the flag is read by the kernel. ``a`` and ``b``
may be host floats or 0-d device tensors (a clip coefficient, AdaLomo's relative step), multiplied in on the device.

With ``finite`` (a 0-d int32 slot of :class:`~lightning_memopt.core.nonfinite.TensorFlags`), an element of ``u``
that is not finite (after clamping) is not applied, and the slot is set to 0: an update inside backward cannot wait
for the whole gradient's check, and for an elementwise rule (SGD) leaving out those elements is exact.

On CUDA with Triton one kernel does it (no more memory traffic than ``d.add_(u)``); elsewhere a torch version computes
the same fp32 arithmetic with one rounding at the end, so both give the same result.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from lightning_memopt.core._triton import kernels

Scalar = float | Tensor

def _kernels():
    return kernels("_axpby_triton")


def axpby_(
    d: Tensor,
    u: Tensor,
    a: Scalar,
    b: Scalar = 1.0,
    ok: Tensor | None = None,
    clamp: float | None = None,
    finite: Tensor | None = None,
) -> Tensor:
    """In place ``d ← round(b·d + a·clamp(u, -clamp, clamp))`` computed in fp32; ``d`` unchanged where ``ok`` (a 0-d
    bool tensor) is false, whatever ``u`` holds. ``d`` and ``u`` are contiguous tensors of the same shape. With
    ``finite``, elements whose clamped ``u`` is not finite keep their value, and ``finite`` becomes 0 if any did."""
    if d.device.type == "cuda" and d.is_contiguous() and u.is_contiguous() and _kernels() is not None:
        _kernels().axpby_(d, u, a, b, ok, clamp, finite)  # type: ignore[union-attr]
        return d
    old = d.float()
    uf = u.float()
    if clamp is not None:
        uf = uf.clamp(-clamp, clamp)  # NaN stays NaN (the kernel's clamp propagates it too)
    new = old * b + uf * a if isinstance(a, Tensor) else old * b + a * uf
    keep = ok
    if finite is not None:
        fin = uf.isfinite()
        finite.mul_(fin.all())
        keep = fin if ok is None else fin & ok
    if keep is not None:
        new = new.where(keep, old)
    d.copy_(new)
    return d


def axpby_many_(ds: Sequence[Tensor], u: Tensor, a: float, b: float = 1.0, ok: Tensor | None = None) -> None:
    """:func:`axpby_` for tensors of one shape, dtype and device at once: ``ds[i] ← round(b·ds[i] + a·u[i])`` with
    ``u`` one contiguous tensor ``[len(ds), *shape]`` (host ``a`` and ``b``). One launch on CUDA with Triton."""
    if not ds:
        return
    if (ds[0].device.type == "cuda" and u.is_contiguous() and all(d.is_contiguous() for d in ds)
            and _kernels() is not None):
        _kernels().axpby_many_(list(ds), u, a, b, ok)  # type: ignore[union-attr]
        return
    for d, ui in zip(ds, u.unbind(0)):
        axpby_(d, ui, a, b, ok)
