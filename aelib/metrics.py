"""Image-quality metrics: scikit-image's PSNR and SSIM, averaged over a batch."""

from __future__ import annotations

import numpy as np

from aelib import data as data_lib

# scikit-image is imported on first use: it pulls in SciPy (~0.6 s), which
# `import aelib` (for loading a model, or in a Ray worker) does not need.


def _as_hw(x: np.ndarray, data_range: float) -> np.ndarray:
    """(N, H, W[, C]) or (N, H*W) square images -> (N, H, W[, C]) float64, C > 1 kept.

    Values outside [0, data_range] are refused: uint8 digits against the default
    data_range=1.0 gave a PSNR of -18.9 dB where the truth is about 29 dB."""
    x = np.asarray(x).astype(np.float64, copy=False)
    low, high = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    slack = 1e-6 * data_range  # (float32 rounding)
    if low < -slack or high > data_range + slack:
        raise ValueError(
            f"Images must have values in [0, data_range={data_range}]. Received values from "
            f"{low:g} to {high:g}: scale them to [0, 1] (aelib.data.scale), or pass their "
            "data_range (255 for 8-bit)"
        )
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim == 2:
        x = data_lib.unflatten(x)
    return x


def _per_image(metric, reference: np.ndarray, images: np.ndarray, data_range: float, **kw):
    ref, img = _as_hw(reference, data_range), _as_hw(images, data_range)
    if ref.shape != img.shape:
        raise ValueError(f"Shapes differ: reference {ref.shape} vs images {img.shape}")
    pairs = zip(ref, img, strict=True)
    return np.array([metric(r, i, data_range=data_range, **kw) for r, i in pairs])


def psnr(reference: np.ndarray, images: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Per-image PSNR in dB (the mean over images is what we report).

    Both take a batch: (N, H, W), (N, H, W, C), or (N, H*W) flat square images (a
    dense model's). A 2-D array is read as flat images, so one H x W image needs its
    batch axis: `psnr(a[None], b[None])`."""
    from skimage.metrics import peak_signal_noise_ratio

    return _per_image(peak_signal_noise_ratio, reference, images, data_range)


def ssim(reference: np.ndarray, images: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Per-image SSIM (scikit-image's default: a uniform 7x7 window); of (N, H, W, C)
    color images, the mean over their channels."""
    from skimage.metrics import structural_similarity

    color = np.ndim(images) == 4 and np.shape(images)[-1] > 1
    kw = {"channel_axis": -1} if color else {}
    return _per_image(structural_similarity, reference, images, data_range, **kw)


def binary_crossentropy(targets: np.ndarray, outputs: np.ndarray, eps: float = 1e-7) -> float:
    """Mean per-pixel binary cross-entropy of outputs clipped to [eps, 1 - eps], as
    Keras's backend-neutral loss computes it (under JAX and PyTorch, the compiled loss).
    TensorFlow's compiled loss reads a sigmoid layer's logits instead, so the model's
    `test_loss` differs from this where outputs saturate below eps (a diverged model);
    this one is the same for every variant and backend."""
    t = np.asarray(targets, dtype=np.float64)
    o = np.clip(np.asarray(outputs, dtype=np.float64), eps, 1.0 - eps)
    return float(np.mean(-(t * np.log(o) + (1.0 - t) * np.log(1.0 - o))))
