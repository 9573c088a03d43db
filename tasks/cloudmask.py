"""Cloud and cloud-shadow masks from reflectance alone, and their agreement with reference masks.

cropflow's cubes mask Sentinel-2 with the SCL layer and Landsat with QA_PIXEL (`tasks.sensors`), cloud classes
grown by `scl_dilation` pixels (`dilate`). Scenes without such a layer (Sentinel-2 items without SCL, see the cube's
`s2_cloud_mask`; the reference scenes of `cloudmask-reference/`, six reflectance bands only) need a spectral test;
this one is the first pass of Fmask (Zhu & Woodcock 2012, "Object-based cloud and cloud shadow detection in Landsat
imagery", RSE 118: 83-94) without its thermal test, with the paper's thresholds:

- cloud: NDSI < 0.8, NDVI < 0.8, SWIR2 > 0.03, whiteness < 0.7 (mean absolute deviation of blue, green, red
  from their mean, over the mean), HOT = blue - 0.5 red - 0.08 > 0, NIR / SWIR1 > 0.75;
- shadow: dark in NIR and SWIR1 (both below 0.12) where not cloud and not water (green above NIR);
- clear: the rest.

Agreement is Cohen's kappa of the confusion matrix (`tasks.evaluate.accuracy_metrics`), three classes (shadow,
clear, cloud) as the reference's own tests score it, or two (invalid = cloud or shadow, valid) as a cube uses it.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from tasks.evaluate import accuracy_metrics, confusion_matrix

SHADOW, CLEAR, CLOUD = 0, 1, 2
CLASSES = ("shadow", "clear", "cloud")
REFERENCE_CODES = {0: SHADOW, 1: CLEAR, 2: CLEAR, 3: CLEAR, 4: CLOUD}  # ukis-csmask test files
DARK = 0.12


def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    """`mask` grown by `pixels` in every direction (a square of side 2 x pixels + 1)."""
    if pixels <= 0:
        return mask
    return ndimage.maximum_filter(mask, size=2 * pixels + 1, mode="constant", cval=False)


def spectral_mask(img: np.ndarray, shadows: bool = True, dilation: int = 0) -> np.ndarray:
    """(H, W) uint8 classes `SHADOW`, `CLEAR`, `CLOUD` of reflectance `img` (H, W, 6: blue, green, red, NIR, SWIR1,
    SWIR2); clouds (and shadows) grown by `dilation` pixels as `scl_dilation` grows SCL clouds."""
    blue, green, red, nir, swir1, swir2 = np.moveaxis(img.astype(np.float64), -1, 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ndsi = (green - swir1) / (green + swir1)
        ndvi = (nir - red) / (nir + red)
        mean_vis = (blue + green + red) / 3
        whiteness = (np.abs(blue - mean_vis) + np.abs(green - mean_vis) + np.abs(red - mean_vis)) / mean_vis
        ratio = nir / swir1
    cloud = (ndsi < 0.8) & (ndvi < 0.8) & (swir2 > 0.03) & (whiteness < 0.7)
    cloud &= (blue - 0.5 * red - 0.08 > 0) & (ratio > 0.75)
    cloud = dilate(cloud, dilation)
    out = np.full(cloud.shape, CLEAR, np.uint8)
    if shadows:
        shadow = (nir < DARK) & (swir1 < DARK) & (green <= nir) & ~cloud
        out[dilate(shadow, dilation) & ~cloud] = SHADOW
    out[cloud] = CLOUD
    return out


def reference_classes(msk: np.ndarray) -> np.ndarray:
    """(H, W) classes `SHADOW`, `CLEAR`, `CLOUD` of a reference mask (0 shadow, 1-3 clear, 4 cloud)."""
    codes = np.asarray(msk).reshape(msk.shape[:2])
    unknown = sorted(set(np.unique(codes).tolist()) - set(REFERENCE_CODES))
    if unknown:
        raise ValueError(f"reference mask codes {unknown} are not shadow (0), clear (1-3) or cloud (4)")
    return np.vectorize(REFERENCE_CODES.get, otypes=[np.uint8])(codes)


def mask_agreement(predicted: np.ndarray, reference: np.ndarray) -> dict:
    """Kappa and overall accuracy of `predicted` against `reference` classes, three classes and invalid/valid."""
    three = accuracy_metrics(confusion_matrix(reference, predicted, 3), list(CLASSES))
    binary = accuracy_metrics(confusion_matrix(reference != CLEAR, predicted != CLEAR, 2), ["valid", "invalid"])
    return {
        "kappa_3class": three["kappa"],
        "overall_accuracy_3class": three["overall_accuracy"],
        "kappa_invalid_valid": binary["kappa"],
        "overall_accuracy_invalid_valid": binary["overall_accuracy"],
        "predicted_fraction": {name: float((predicted == i).mean()) for i, name in enumerate(CLASSES)},
        "reference_fraction": {name: float((reference == i).mean()) for i, name in enumerate(CLASSES)},
    }
