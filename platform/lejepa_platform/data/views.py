"""Multi-crop views (DINO style, as LeJEPA uses them), pure numpy + torch and seeded per record.

Every random number a view needs comes from one generator seeded by (seed, epoch, hash of the
record id), drawn as a fixed block of uniforms per view. So a record's views do not depend on the
batch it lands in, the worker that makes it, or the order rows arrive: a run is reproducible, and
another epoch gives other views.

Per image only the crop is done one view at a time (images in a batch may differ in size):
RandomResizedCrop geometry (scale range, aspect 3/4..4/3, 10 tries then a centre crop, as in
torchvision) and an antialiased bilinear resize on uint8. Everything photometric then runs
vectorised over all views of the batch at one resolution: horizontal flip, colour jitter
(brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, applied in a random order per view),
grayscale, Gaussian blur (sigma 0.1..2 px), solarize (threshold 128). Views leave as uint8;
`normalize` turns them into float32 on whatever device the consumer uses.

The photometric half runs where data.augment_on puts it: in `multi_crop` (the data side), or on the
trainer's device (`multi_crop(..., photometric=False)` ships each view's float32 params with the
crops, `augment_views` applies them after the host-to-device copy). Both call `photometric`, so
the views are the same either way.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lejepa_platform.config import DataConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
JITTER = (0.4, 0.4, 0.2, 0.1)
"""Colour jitter strengths: brightness, contrast, saturation, hue."""
BLUR_SIGMA = (0.1, 2.0)
BLUR_RADIUS = 6
"""Taps on each side of the blur kernel: 3 sigma at the largest sigma."""
PHOTOMETRIC_CHUNK = 2**20
"""Float elements per photometric pass: keeps temporaries cache-sized (measured faster than whole batches)."""
RATIO = (3.0 / 4.0, 4.0 / 3.0)
TRIES = 10

# Layout of the uniforms drawn for each view.
_SCALE, _RATIO = slice(0, TRIES), slice(TRIES, 2 * TRIES)
_TOP, _LEFT, _FLIP, _JITTER = 20, 21, 22, 23
_FACTORS, _ORDER = slice(24, 28), slice(28, 32)
_GRAY, _BLUR, _SIGMA, _SOLARIZE = 32, 33, 34, 35
UNIFORMS_PER_VIEW = 36
# The photometric ones are the tail of that block; `photometric` reads them in this layout.
_PHOTOMETRIC = slice(_FLIP, UNIFORMS_PER_VIEW)
PHOTOMETRIC_PARAMS = UNIFORMS_PER_VIEW - _FLIP
"""Float32 parameters per view that the photometric ops read (`photometric_params`)."""
_P_FLIP, _P_JITTER, _P_GRAY, _P_BLUR, _P_SIGMA, _P_SOLARIZE = (i - _FLIP for i in (_FLIP, _JITTER, _GRAY, _BLUR,
                                                                                  _SIGMA, _SOLARIZE))
_P_FACTORS = slice(_FACTORS.start - _FLIP, _FACTORS.stop - _FLIP)
_P_ORDER = slice(_ORDER.start - _FLIP, _ORDER.stop - _FLIP)


def _constant(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """A 1-d float32 tensor of `values` on like's device, made by fill kernels: a tensor made from a
    Python list would be copied host to device, which waits for the device."""
    return torch.stack([torch.full((), v, dtype=torch.float32, device=like.device) for v in values])


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 standardised with ImageNet mean/std, on x's device."""
    mean = _constant(IMAGENET_MEAN, x).view(3, 1, 1) * 255.0
    inv_std = 1.0 / (_constant(IMAGENET_STD, x).view(3, 1, 1) * 255.0)
    return (x.to(torch.float32) - mean) * inv_std


def record_seed(record_id: str) -> int:
    """Stable 64-bit hash of a record id (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(record_id.encode(), digest_size=8).digest(), "little")


def view_uniforms(seed: int, epoch: int, ids: Sequence[str], views: int) -> np.ndarray:
    """(B, views, UNIFORMS_PER_VIEW) float64 uniforms in [0, 1), one generator per record."""
    out = np.empty((len(ids), views, UNIFORMS_PER_VIEW))
    base = [seed % 2**64, epoch % 2**64]
    for row, record_id in enumerate(ids):
        out[row] = np.random.default_rng(base + [record_seed(record_id)]).random((views, UNIFORMS_PER_VIEW))
    return out


def crop_boxes(u: np.ndarray, heights: np.ndarray, widths: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """RandomResizedCrop geometry, vectorised: (B, V, 4) int64 boxes (top, left, height, width).

    u: (B, V, UNIFORMS_PER_VIEW); heights, widths: (B,); scales: (V, 2) area range per view.
    """
    H = heights.astype(np.float64)[:, None, None]
    W = widths.astype(np.float64)[:, None, None]
    lo, hi = scales[None, :, 0:1], scales[None, :, 1:2]
    target = H * W * (lo + (hi - lo) * u[..., _SCALE])
    log_lo, log_hi = math.log(RATIO[0]), math.log(RATIO[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * u[..., _RATIO])
    w = np.round(np.sqrt(target * aspect))
    h = np.round(np.sqrt(target / aspect))
    ok = (w > 0) & (h > 0) & (w <= W) & (h <= H)
    first = ok.argmax(axis=-1)[..., None]
    found = ok.any(axis=-1)
    w = np.take_along_axis(w, first, axis=-1)[..., 0]
    h = np.take_along_axis(h, first, axis=-1)[..., 0]
    H, W = H[..., 0], W[..., 0]
    # Fallback (no try fits): the largest centred crop with the aspect ratio clamped to RATIO.
    in_ratio = W / H
    fw = np.where(in_ratio > RATIO[1], np.round(H * RATIO[1]), W)
    fh = np.where(in_ratio < RATIO[0], np.round(W / RATIO[0]), H)
    w = np.where(found, w, np.broadcast_to(fw, w.shape))
    h = np.where(found, h, np.broadcast_to(fh, h.shape))
    top = np.where(found, np.floor(u[..., _TOP] * (H - h + 1)), (H - h) // 2)
    left = np.where(found, np.floor(u[..., _LEFT] * (W - w + 1)), (W - w) // 2)
    return np.stack([top, left, h, w], axis=-1).astype(np.int64)


def resize_crop(image: torch.Tensor, box: Sequence[int], size: int) -> torch.Tensor:
    """(3, H, W) uint8 (any strides) -> (3, size, size) uint8, antialiased bilinear."""
    top, left, h, w = (int(v) for v in box)
    crop = image[None, :, top:top + h, left:left + w]
    return F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def as_chw(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 numpy -> (3, H, W) torch view (channels-last strides; copied only if read-only)."""
    return torch.from_numpy(image if image.flags.writeable else np.array(image)).permute(2, 0, 1)


# --------------------------------------------------------------------------------------------
# Photometric augmentation on float32 in [0, 255], vectorised over views.
#
# Its random numbers travel as float32 (`photometric_params`), so that the data side and the trainer
# feed the very same values to the very same code whichever of them runs it.


def photometric_params(u: np.ndarray) -> np.ndarray:
    """(..., UNIFORMS_PER_VIEW) float64 uniforms -> (..., PHOTOMETRIC_PARAMS) float32: what
    `photometric` reads, in the form both placements use."""
    return u[..., _PHOTOMETRIC].astype(np.float32)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return GRAY_WEIGHTS[0] * x[:, 0:1] + GRAY_WEIGHTS[1] * x[:, 1:2] + GRAY_WEIGHTS[2] * x[:, 2:3]


def _affine(x: torch.Tensor, f: torch.Tensor, towards: torch.Tensor | float) -> torch.Tensor:
    """x * f + towards * (1 - f), clamped: brightness (towards 0), contrast (the grey mean) and
    saturation (the grey image) are all this blend."""
    f = f.view(-1, 1, 1, 1)
    return (x * f + towards * (1.0 - f)).clamp_(0.0, 255.0)


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * f.view(-1, 1, 1, 1)).clamp_(0.0, 255.0)  # _affine towards 0, without adding the zeros


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _affine(x, f, _gray(x).mean(dim=(1, 2, 3), keepdim=True))


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _affine(x, f, _gray(x))


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by `shift` turns (in [-0.5, 0.5]); value and saturation are unchanged.
    Written without branches or index tensors: the slow parts of a straightforward version."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    maxc = x.amax(dim=1)
    delta = maxc - x.amin(dim=1)
    inv = delta.reciprocal().nan_to_num_(posinf=0.0)
    red = (r == maxc).to(x.dtype)
    green = (g == maxc).to(x.dtype).mul_(1.0 - red)
    blue = 1.0 - red - green
    # Hue in sixths of a turn, in [-1, 5): the largest channel picks the sector.
    sixths = red * (g - b) + green * (b - r + 2.0 * delta) + blue * (r - g + 4.0 * delta)
    sixths.mul_(inv).add_(6.0 * shift.view(-1, 1, 1))
    sixths.add_((sixths < 0).to(x.dtype), alpha=6.0)  # now in [0, 6)
    k = _constant(_HSV_OFFSETS, x).view(1, 3, 1, 1) + sixths[:, None]  # in [1, 11)
    k.sub_((k >= 6.0).to(x.dtype), alpha=6.0)
    # Channel weight: the trapezoid min(k, 4 - k) clipped to [0, 1], i.e. 2 - |k - 2| clipped.
    return k.sub_(2.0).abs_().neg_().add_(2.0).clamp_(0.0, 1.0).mul_(-delta[:, None]).add_(maxc[:, None])


_HSV_OFFSETS = (5.0, 3.0, 1.0)
_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
_CONTRAST, _SATURATION, _HUE = 1, 2, 3
"""Indices into _JITTER_OPS (brightness is 0)."""


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-view sigma (pixels), reflect padding."""
    n, c, h, w = x.shape
    pad = min(BLUR_RADIUS, h - 1, w - 1)
    taps = torch.arange(-pad, pad + 1, dtype=torch.float32, device=x.device)
    kernel = torch.exp(-0.5 * (taps[None, :] / sigma[:, None]) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)
    flat = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=n * c)
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=n * c)
    return flat.reshape(n, c, h, w)


def _jitter_factors(params: torch.Tensor) -> torch.Tensor:
    """(N, 4) factors: brightness, contrast, saturation in 1 +- strength, hue shift in +- strength."""
    offset = _constant((1.0, 1.0, 1.0, 0.0), params)
    return (2.0 * params[:, _P_FACTORS] - 1.0) * _constant(JITTER, params) + offset


def _jitter_order(params: torch.Tensor) -> torch.Tensor:
    """(N, 4) op index at each jitter position (a stable sort: ties order the same on every device)."""
    return torch.argsort(params[:, _P_ORDER], dim=1, stable=True)


def _blur_sigma(params: torch.Tensor) -> torch.Tensor:
    return BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * params[:, _P_SIGMA]


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.round_().clamp_(0.0, 255.0).to(torch.uint8)


def _subset(mask: torch.Tensor) -> torch.Tensor | None:
    index = mask.nonzero().flatten()
    return index if len(index) else None


def _photometric_subset(views: torch.Tensor, params: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """Each op on the index subset of views that draw it: least arithmetic, but it reads the choices
    back to the host (fast on CPU, a synchronisation on an accelerator)."""
    views = views.clone()
    if (idx := _subset(params[:, _P_FLIP] < cfg.flip_p)) is not None:
        views[idx] = views[idx].flip(-1)
    x = views.to(torch.float32)
    jitter = params[:, _P_JITTER] < cfg.jitter_p
    factors, order = _jitter_factors(params), _jitter_order(params)
    for position in range(4):
        for op, fn in enumerate(_JITTER_OPS):
            if (idx := _subset(jitter & (order[:, position] == op))) is not None:
                x[idx] = fn(x[idx], factors[idx, op])
    if (idx := _subset(params[:, _P_GRAY] < cfg.grayscale_p)) is not None:
        x[idx] = _gray(x[idx]).expand(-1, 3, -1, -1)
    if (idx := _subset(params[:, _P_BLUR] < cfg.blur_p)) is not None:
        x[idx] = gaussian_blur(x[idx], _blur_sigma(params[idx]))
    out = _to_uint8(x)
    if (idx := _subset(params[:, _P_SOLARIZE] < cfg.solarize_p)) is not None:
        sub = out[idx]
        out[idx] = torch.where(sub >= 128, 255 - sub, sub)
    return out


def _photometric_blend(views: torch.Tensor, params: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """Each op on every view, kept where the view drew it (torch.where): no data-dependent shape and
    nothing read back to the host, so it queues on an accelerator and compiles as one graph."""
    def drawn(column: int, p: float) -> torch.Tensor:
        return (params[:, column] < p).view(-1, 1, 1, 1)

    views = torch.where(drawn(_P_FLIP, cfg.flip_p), views.flip(-1), views)
    x = views.to(torch.float32)
    jitter = drawn(_P_JITTER, cfg.jitter_p)
    factors, order = _jitter_factors(params), _jitter_order(params)
    for position in range(4):
        op = order[:, position].view(-1, 1, 1, 1)
        hue = jitter & (op == _HUE)
        # One affine blend covers brightness, contrast and saturation: per view, its op's factor and target.
        f = factors.gather(1, order[:, position:position + 1]).view(-1, 1, 1, 1)
        gray = _gray(x)
        mean = gray.mean(dim=(1, 2, 3), keepdim=True)
        towards = torch.where(op == _SATURATION, gray, torch.where(op == _CONTRAST, mean, 0.0))
        affine = _affine(x, f, towards)
        x = torch.where(hue, adjust_hue(x, factors[:, _HUE]), torch.where(jitter & (op != _HUE), affine, x))
    x = torch.where(drawn(_P_GRAY, cfg.grayscale_p), _gray(x).expand(-1, 3, -1, -1), x)
    x = torch.where(drawn(_P_BLUR, cfg.blur_p), gaussian_blur(x, _blur_sigma(params)), x)
    out = _to_uint8(x)
    return torch.where(drawn(_P_SOLARIZE, cfg.solarize_p) & (out >= 128), 255 - out, out)


STRATEGIES = ("auto", "subset", "blend")


def photometric(views: torch.Tensor, params: torch.Tensor, cfg: DataConfig, *, strategy: str = "auto") -> torch.Tensor:
    """uint8 (N, 3, S, S) views and their (N, PHOTOMETRIC_PARAMS) float32 params -> augmented uint8
    views, on the views' device. strategy: "subset" (index subsets), "blend" (no host-device
    synchronisation) or "auto" (subset on CPU outside torch.compile, else blend); both give the
    same views up to a rare rounding step."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    if strategy == "auto":
        on_cpu = views.device.type == "cpu" and not torch.compiler.is_compiling()
        strategy = "subset" if on_cpu else "blend"
    run = _photometric_subset if strategy == "subset" else _photometric_blend
    return run(views, params, cfg)


def _photometric_chunked(flat: torch.Tensor, params: torch.Tensor, cfg: DataConfig,
                         strategy: str = "auto") -> torch.Tensor:
    """`photometric` over (N, 3, S, S) views; on CPU in chunks of PHOTOMETRIC_CHUNK floats (cache-sized)."""
    if flat.device.type != "cpu":
        return photometric(flat, params, cfg, strategy=strategy)
    out = torch.empty_like(flat)
    step = max(1, PHOTOMETRIC_CHUNK // (3 * flat.shape[-1] * flat.shape[-2]))
    for start in range(0, len(flat), step):
        out[start:start + step] = photometric(flat[start:start + step], params[start:start + step], cfg,
                                              strategy=strategy)
    return out


_PARAM_KEYS = {"global": "global_params", "local": "local_params"}
"""Batch key of each view group's photometric params (data.augment_on=device)."""


def augment_views(batch: dict[str, torch.Tensor], cfg: DataConfig, *, strategy: str = "auto") -> dict[str, torch.Tensor]:
    """The trainer's half of the views (data.augment_on=device): {"global": (B, G, 3, H, W) uint8,
    "global_params": (B, G, PHOTOMETRIC_PARAMS) float32, optionally "local"/"local_params"} ->
    the batch with the views photometrically augmented on their device and the params dropped."""
    out = {key: value for key, value in batch.items() if key not in _PARAM_KEYS.values()}
    for name, key in _PARAM_KEYS.items():
        if key in batch:
            views = batch[name]
            params = batch[key].to(views.device).flatten(0, 1)
            out[name] = _photometric_chunked(views.flatten(0, 1), params, cfg, strategy).view_as(views)
    return out


# --------------------------------------------------------------------------------------------


def decode_side(cfg: DataConfig) -> int:
    """Shorter side an image needs so that its smallest crop still has the view's resolution."""
    need = cfg.global_size / math.sqrt(cfg.global_scale[0])
    if cfg.local_views:
        need = max(need, cfg.local_size / math.sqrt(cfg.local_scale[0]))
    return int(math.ceil(need))


def multi_crop(images: Sequence[np.ndarray], ids: Sequence[str], cfg: DataConfig, *, seed: int,
               epoch: int, photometric: bool = True) -> dict[str, np.ndarray]:
    """Decoded (H, W, 3) uint8 images (sizes may differ) -> {"global": (B, G, 3, Hg, Hg),
    "local": (B, L, 3, Hl, Hl)} uint8, every random choice drawn from (seed, epoch, id).

    photometric=False (data.augment_on=device): the geometric crops only, plus the photometric params
    the trainer applies them with (`augment_views`): "global_params" (B, G, PHOTOMETRIC_PARAMS)
    float32 and "local_params" (B, L, PHOTOMETRIC_PARAMS) when L > 0.
    """
    G, L = cfg.global_views, cfg.local_views
    B = len(images)
    u = view_uniforms(seed, epoch, ids, G + L)
    params = photometric_params(u)
    heights = np.array([im.shape[0] for im in images], dtype=np.int64)
    widths = np.array([im.shape[1] for im in images], dtype=np.int64)
    scales = np.array([cfg.global_scale] * G + [cfg.local_scale] * L, dtype=np.float64).reshape(G + L, 2)
    boxes = crop_boxes(u, heights, widths, scales)
    result = {}
    for name, first, count, size in (("global", 0, G, cfg.global_size), ("local", G, L, cfg.local_size)):
        crops = torch.empty((B, count, 3, size, size), dtype=torch.uint8)
        for b, image in enumerate(images):
            chw = as_chw(image)
            for v in range(count):
                crops[b, v] = resize_crop(chw, boxes[b, first + v], size)
        group_params = np.ascontiguousarray(params[:, first:first + count])
        if count and photometric:
            flat_params = torch.from_numpy(group_params.reshape(B * count, PHOTOMETRIC_PARAMS))
            crops = _photometric_chunked(crops.flatten(0, 1), flat_params, cfg).view_as(crops)
        elif count:
            result[_PARAM_KEYS[name]] = group_params
        result[name] = crops.numpy()
    return result


def center_views(images: Sequence[np.ndarray], size: int) -> np.ndarray:
    """Evaluation view: the centred square of each image resized to size x size -> (N, 3, S, S) uint8.
    Same as resizing the shorter side to `size` then centre-cropping, up to rounding."""
    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8)
    for i, image in enumerate(images):
        h, w = image.shape[:2]
        side = min(h, w)
        out[i] = resize_crop(as_chw(image), ((h - side) // 2, (w - side) // 2, side, side), size)
    return out.numpy()
