"""SIGReg: the sliced Epps-Pulley test of "projections look standard Gaussian".

Per view, the projections z (N, D) are sliced along M random unit directions, x = z @ A (N, M).
For every slice the empirical characteristic function (ECF) at K equally spaced knots is compared
with the standard normal one, exp(-t^2/2), under the window exp(-t^2/2) with trapezoid weights:

    stat(slice) = N_global * sum_k w_k * ((c_k - exp(-t_k^2/2))^2 + s_k^2),
    c_k = mean_n cos(t_k x_n),  s_k = mean_n sin(t_k x_n),

averaged over slices, then over views (pooling views into one batch would inflate it ~V times).

Why a custom autograd Function: the straightforward version materialises (N, M, K) tensors for
t*x, cos and sin and keeps them for backward, and evaluates 2K transcendentals per slice element
forward and again backward. Here the ECF means are computed in chunks of slices; because the knots
are equally spaced (t_k = k dt), cos(k dt x) and sin(k dt x) follow from cos(dt x) and sin(dt x)
by angle addition (re-seeded with exact values every few knots to bound rounding drift), and the
backward recomputes them instead of storing them. Only x (N, M) is saved.

Distributed: the per-rank ECF means go through `all_reduce_mean` as ordinary autograd ops, so the
value on every rank equals the single-process value on the concatenated batch, each rank's
gradient is world_size x its share, and DDP's averaging restores the single-process gradient.
Every rank must hold the same number of rows (N_global = N * world_size).
"""

from __future__ import annotations

import hashlib
import math

import torch

from lejepa_platform.distributed import all_reduce_mean, world_size
from lejepa_platform.errors import UserError

RESEED_EVERY = 8
"""Knots between exact cos/sin evaluations: keeps recurrence drift near float32 rounding (~1e-6)."""


def slice_directions(dim: int, num_slices: int, *, seed: int, step: int,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Unit-norm random directions (dim, num_slices), float32, a pure function of (seed, step).

    Drawn on the CPU from a private generator so every rank (and every device type) gets the same
    matrix without communication, a fresh one every step, and the global RNG is never touched.
    """
    if dim < 1 or num_slices < 1:
        raise UserError(f"slice_directions needs dim >= 1 and num_slices >= 1, got dim={dim}, "
                        f"num_slices={num_slices}")
    digest = hashlib.blake2b(f"sigreg:{int(seed)}:{int(step)}".encode(), digest_size=8).digest()
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    a = torch.randn(dim, num_slices, generator=generator, dtype=torch.float32)
    a = a / a.norm(dim=0, keepdim=True)
    if device is not None and torch.device(device).type == "cuda":
        return a.pin_memory().to(device, non_blocking=True)  # pinned: the copy does not wait for the device
    return a if device is None else a.to(device)


def quadrature(knots: int, t_max: float, *, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Knots t (K,), target ECF exp(-t^2/2) (K,) and weights (K,) of the windowed trapezoid rule.

    The integrand is even, so [0, t_max] is integrated and doubled: interior weights 2 dt, end
    points dt, all times the window exp(-t^2/2).
    """
    _check_quadrature(knots, t_max)
    t = torch.linspace(0.0, t_max, knots, dtype=torch.float64)
    dt = t_max / (knots - 1)
    w = torch.full((knots,), 2.0 * dt, dtype=torch.float64)
    w[0] = w[-1] = dt
    phi = torch.exp(-0.5 * t.square())
    return (t.to(dtype=dtype, device=device), phi.to(dtype=dtype, device=device),
            (w * phi).to(dtype=dtype, device=device))


def sigreg_per_view(z: torch.Tensor, directions: torch.Tensor, *, knots: int = 17, t_max: float = 3.0,
                    chunk_size: int | None = None, check_finite: bool | None = None) -> torch.Tensor:
    """SIGReg statistic of each view, shape (V,) (V = 1 for z of shape (N, D)).

    Computed in float32 (float64 stays float64) whatever the autocast state. `chunk_size` is the
    number of slices processed at once (memory/speed trade-off; the value does not depend on it).
    `check_finite` (default: only for CPU tensors) rejects NaN/Inf in z; on an accelerator the
    check would force a device sync every call, so there a non-finite z gives a NaN statistic.
    """
    z3 = _check_inputs(z, directions, knots, t_max, chunk_size, check_finite)
    dtype = torch.float64 if z3.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=z3.device.type, enabled=False):
        a = directions.to(device=z3.device, dtype=dtype)
        x = a.t() @ z3.to(dtype).transpose(1, 2)  # (V, M, N): one row per slice
        views, m, n = x.shape
        _, phi, w = quadrature(knots, t_max, dtype=dtype, device=x.device)
        chunk = chunk_size or _default_chunk(n, x.device)
        c, s = _EcfMeans.apply(x.reshape(views * m, n), t_max / (knots - 1), knots, chunk)
        cs = all_reduce_mean(torch.stack((c, s)).reshape(2, views, m, knots))
        err = (cs[0] - phi).square() + cs[1].square()  # (V, M, K)
        return (err @ w).mean(dim=-1) * (n * world_size())


def sigreg(z: torch.Tensor, directions: torch.Tensor, *, knots: int = 17, t_max: float = 3.0,
           chunk_size: int | None = None, check_finite: bool | None = None) -> torch.Tensor:
    """SIGReg statistic averaged over slices and views (scalar); see `sigreg_per_view`."""
    return sigreg_per_view(z, directions, knots=knots, t_max=t_max, chunk_size=chunk_size,
                           check_finite=check_finite).mean()


class _EcfMeans(torch.autograd.Function):
    """Per-rank ECF means c, s (M, K) of the rows of x (M, N) at knots k * dt, k < K.

    Never holds more than one chunk of cos/sin values; backward recomputes them.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, dt: float, knots: int, chunk: int):  # type: ignore[override]
        m, n = x.shape
        c = x.new_empty(knots, m)
        s = x.new_empty(knots, m)
        c[0], s[0] = 1.0, 0.0
        for lo in range(0, m, chunk):
            for k, ck, sk in _rotations(x[lo:lo + chunk], dt, knots):
                torch.sum(ck, dim=1, out=c[k, lo:lo + chunk])
                torch.sum(sk, dim=1, out=s[k, lo:lo + chunk])
        c[1:] /= n
        s[1:] /= n
        ctx.save_for_backward(x)
        ctx.dt, ctx.knots, ctx.chunk = dt, knots, chunk
        return c.t(), s.t()

    @staticmethod
    def backward(ctx, grad_c: torch.Tensor, grad_s: torch.Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        m, n = x.shape
        t = torch.arange(ctx.knots, dtype=x.dtype, device=x.device).unsqueeze(1) * (ctx.dt / n)
        # d/dx cos(t x) = -t sin(t x), d/dx sin(t x) = t cos(t x); 1/n from the mean.
        a = (grad_c.t() * -t).unsqueeze(-1)  # (K, M, 1)
        b = (grad_s.t() * t).unsqueeze(-1)
        grad_x = torch.zeros_like(x)
        for lo in range(0, m, ctx.chunk):
            hi = lo + ctx.chunk
            g = grad_x[lo:hi]
            for k, ck, sk in _rotations(x[lo:hi], ctx.dt, ctx.knots):
                g.addcmul_(sk, a[k, lo:hi]).addcmul_(ck, b[k, lo:hi])
        return grad_x, None, None, None


def _default_chunk(n: int, device: torch.device) -> int:
    """Slices per chunk when the caller does not say.

    Each chunk costs ~12 small ops per knot, so larger chunks mean fewer ops; the buffers (seven of
    N x chunk) bound the memory. CPU: 2^18 elements (7 MB of buffers): as fast as 2^16 on an idle
    2-core machine and much faster when cores are oversubscribed. Accelerators: kernel launches
    dominate, so 2^22 elements (~16 MB per buffer); not yet measured on a GPU.
    """
    return max(1, (1 << 18 if device.type == "cpu" else 1 << 22) // n)


def _rotations(x: torch.Tensor, dt: float, knots: int):
    """Yield (k, cos(k dt x), sin(k dt x)) for k = 1..knots-1 by angle addition.

    Two transcendentals per element at k = 1 and one exact pair every RESEED_EVERY knots; the
    yielded tensors are reused buffers, valid until the next iteration.
    """
    angle = x * dt
    c1, s1 = torch.cos(angle), torch.sin(angle)
    pairs = ((angle, torch.empty_like(x)), (torch.empty_like(x), torch.empty_like(x)))
    ck, sk = c1, s1
    for k in range(1, knots):
        if k > 1:
            nc, ns = pairs[k % 2]  # never the pair read from
            if k % RESEED_EVERY == 0:
                torch.mul(x, k * dt, out=nc)
                torch.sin(nc, out=ns)
                torch.cos(nc, out=nc)
            else:
                torch.mul(ck, c1, out=nc).addcmul_(sk, s1, value=-1.0)
                torch.mul(sk, c1, out=ns).addcmul_(ck, s1)
            ck, sk = nc, ns
        yield k, ck, sk


def describe(x: object) -> str:
    """'torch.float32 of shape (2, 3)' for a tensor, the type name otherwise: for error messages."""
    return f"{x.dtype} of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def _check_quadrature(knots: int, t_max: float) -> None:
    if isinstance(knots, bool) or not isinstance(knots, int) or knots < 3 or knots % 2 == 0:
        raise UserError(f"SIGReg knots must be an odd integer >= 3, got {knots!r}")
    if not (isinstance(t_max, (int, float)) and math.isfinite(t_max) and t_max > 0):
        raise UserError(f"SIGReg t_max must be a finite number > 0, got {t_max!r}")


def _check_inputs(z: torch.Tensor, directions: torch.Tensor, knots: int, t_max: float,
                  chunk_size: int | None, check_finite: bool | None) -> torch.Tensor:
    """Validate and return z as (V, N, D)."""
    _check_quadrature(knots, t_max)
    if not (isinstance(z, torch.Tensor) and z.is_floating_point() and z.dim() in (2, 3)):
        raise UserError(f"SIGReg input z must be a floating tensor of shape (N, D) or (V, N, D), got {describe(z)}")
    if not (isinstance(directions, torch.Tensor) and directions.is_floating_point() and directions.dim() == 2):
        raise UserError(f"SIGReg directions must be a floating tensor of shape (D, M), got {describe(directions)}")
    if z.shape[-1] != directions.shape[0]:
        raise UserError(f"SIGReg dimension mismatch: z has D={z.shape[-1]} but directions have "
                        f"{directions.shape[0]} rows (shape (D, M) expected)")
    if z.shape[-2] < 1 or directions.shape[1] < 1:
        raise UserError(f"SIGReg needs at least one sample and one slice, got z {tuple(z.shape)}, "
                        f"directions {tuple(directions.shape)}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise UserError(f"SIGReg chunk_size must be a positive integer or None, got {chunk_size!r}")
    if (z.device.type == "cpu" if check_finite is None else check_finite) and not bool(torch.isfinite(z).all()):
        raise UserError("SIGReg input z contains NaN or Inf (diverged training or bad input)")
    return z if z.dim() == 3 else z.unsqueeze(0)
