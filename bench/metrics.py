"""Image and latent quality metrics, in numpy float64, with no downloaded weights.

PSNR and SSIM compare decoded images with values in [0, 1] (data range 1.0). SSIM is the
formulation of Wang, Bovik, Sheikh and Simoncelli (2004): local statistics under an 11x11 Gaussian
window with sigma 1.5, K1 = 0.01, K2 = 0.03, the SSIM map over the window positions that fit inside
the image ("valid", as in the authors' reference code), averaged; colour images per channel, then
averaged over channels.
"""

from __future__ import annotations

import math

import numpy as np

from fastcache.demo import psnr  # noqa: F401  (the project's one PSNR, shared with the demo)

K1, K2 = 0.01, 0.03
WINDOW = 11
SIGMA = 1.5


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    return a, b


def gaussian_window(size: int = WINDOW, sigma: float = SIGMA) -> np.ndarray:
    """The normalised 1-D Gaussian taps; the 2-D window is their outer product."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    taps = np.exp(-(x**2) / (2.0 * sigma**2))
    return taps / taps.sum()


def _filter_valid(image: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable correlation of a 2-D image with taps x taps, keeping only full-window positions."""
    size = taps.size
    rows = np.lib.stride_tricks.sliding_window_view(image, size, axis=0) @ taps
    return np.lib.stride_tricks.sliding_window_view(rows, size, axis=1) @ taps


def ssim_channel(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Mean SSIM of two 2-D arrays (Wang et al. 2004, Gaussian window, valid positions)."""
    a, b = _pair(a, b)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D channel, got shape {a.shape}")
    if min(a.shape) < WINDOW:
        raise ValueError(f"SSIM needs images of at least {WINDOW}x{WINDOW} pixels, got {a.shape}")
    taps = gaussian_window()
    mu_a, mu_b = _filter_valid(a, taps), _filter_valid(b, taps)
    var_a = _filter_valid(a * a, taps) - mu_a**2
    var_b = _filter_valid(b * b, taps) - mu_b**2
    cov = _filter_valid(a * b, taps) - mu_a * mu_b
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(ssim_map.mean())


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """SSIM of (H, W) or (H, W, C) images; channels separately, then averaged."""
    a, b = _pair(a, b)
    if a.ndim == 2:
        return ssim_channel(a, b, data_range)
    if a.ndim != 3:
        raise ValueError(f"expected (H, W) or (H, W, C), got shape {a.shape}")
    return float(np.mean([ssim_channel(a[..., c], b[..., c], data_range) for c in range(a.shape[2])]))


def batch_mean(metric, a: np.ndarray, b: np.ndarray) -> float:
    """`metric` averaged over a leading batch axis of (N, H, W, C) images (inf only if every one is)."""
    a, b = _pair(a, b)
    return float(np.mean([metric(x, y) for x, y in zip(a, b)]))


def relative_l2(actual: np.ndarray, reference: np.ndarray) -> float:
    """||actual - reference||_2 / ||reference||_2 over all elements (0 for identical inputs)."""
    actual, reference = _pair(actual, reference)
    diff = float(np.linalg.norm((actual - reference).ravel()))
    if diff == 0.0:
        return 0.0
    norm = float(np.linalg.norm(reference.ravel()))
    return math.inf if norm == 0.0 else diff / norm
