"""Surface physics of the simulated sample region: classes, phenology, spectra and radar backscatter.

Each parcel is a linear mixture of endmembers (bare soil, green vegetation, dry vegetation, rapeseed flowers,
forest canopy, forest floor, built-up, water) whose fractions follow a class-specific phenology in time
(double-logistic green-up/senescence, harvest, mowing). Reflectance = fractions x endmember spectra; C-band
backscatter follows a water-cloud-like mixture (volume scattering from the canopy, attenuated soil return).
Times are days of the harvest year (1 = 1 January; negative = autumn before), so one season may span the new year.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Endmembers (order of the fraction axis).
SOIL, GREEN, DRY, FLOWER, FOREST, LITTER, URBAN, WATER = range(8)
N_ENDMEMBERS = 8

# Parcel kinds: how the fractions evolve. NON_CROP parcels are each drawn as forest, built-up or water.
CROP, GRASS, FOREST_KIND, URBAN_KIND, WATER_KIND, NON_CROP = range(6)

# Sentinel-2 L2A bands simulated, and their native resolution (m).
# fmt: off
S2_BAND_GSD: dict[str, int] = {
    "B01": 60, "B02": 10, "B03": 10, "B04": 10, "B05": 20, "B06": 20, "B07": 20,
    "B08": 10, "B8A": 20, "B09": 60, "B11": 20, "B12": 20,
}
# fmt: on
S2_BANDS_ALL = tuple(S2_BAND_GSD)

# Endmember reflectance spectra (rows: endmembers in the order above; columns: S2_BANDS_ALL).
SPECTRA = np.array(
    [
        [0.075, 0.090, 0.125, 0.165, 0.190, 0.205, 0.220, 0.235, 0.245, 0.250, 0.330, 0.280],  # soil
        [0.025, 0.030, 0.065, 0.025, 0.100, 0.300, 0.410, 0.450, 0.460, 0.440, 0.210, 0.090],  # green vegetation
        [0.070, 0.085, 0.125, 0.165, 0.220, 0.260, 0.285, 0.300, 0.310, 0.300, 0.380, 0.290],  # dry vegetation
        [0.040, 0.045, 0.210, 0.190, 0.220, 0.320, 0.390, 0.420, 0.430, 0.410, 0.220, 0.100],  # yellow flowers
        [0.020, 0.025, 0.045, 0.022, 0.070, 0.200, 0.270, 0.300, 0.310, 0.290, 0.150, 0.060],  # forest canopy
        [0.040, 0.050, 0.070, 0.090, 0.110, 0.140, 0.160, 0.170, 0.180, 0.180, 0.240, 0.170],  # forest floor
        [0.110, 0.120, 0.135, 0.150, 0.160, 0.170, 0.180, 0.190, 0.195, 0.190, 0.220, 0.200],  # built-up
        [0.045, 0.050, 0.055, 0.035, 0.025, 0.015, 0.012, 0.010, 0.009, 0.008, 0.005, 0.003],  # water
    ],
    dtype=np.float32,
)
# How much wet soil darkens, per band (relative, at full moisture).
SOIL_WETNESS_DARKENING = np.array([0.25] * 10 + [0.35, 0.35], dtype=np.float32)
# Top-of-cloud reflectance and the fraction of light left in cloud shadow, per band.
CLOUD_SPECTRUM = np.array([0.42, 0.44, 0.45, 0.46, 0.47, 0.48, 0.48, 0.49, 0.49, 0.40, 0.36, 0.26], np.float32)
CIRRUS_SPECTRUM = np.array([0.22, 0.22, 0.21, 0.20, 0.20, 0.19, 0.19, 0.18, 0.18, 0.10, 0.12, 0.08], np.float32)
SHADOW_TRANSMISSION = np.array([0.55, 0.50, 0.45, 0.42, 0.40, 0.38, 0.36, 0.35, 0.35, 0.35, 0.33, 0.33], np.float32)

# Landsat 8/9 OLI surface reflectance assets and the S2 band with the closest response.
# fmt: off
LANDSAT_TO_S2 = {
    "coastal": "B01", "blue": "B02", "green": "B03", "red": "B04",
    "nir08": "B8A", "swir16": "B11", "swir22": "B12",
}
# fmt: on


@dataclass(frozen=True)
class CropClass:
    """One legend class and the mean phenology of its parcels (days of the harvest year).

    `emerge`: autumn emergence of winter crops; `base`: winter cover; `peak`: maximum green cover;
    `greenup`/`senescence` with their logistic widths `rg`/`rs`; `harvest`; `flower`: peak flower cover around
    `flower_day`; `regrow`: cover of volunteers/catch crop from `regrow_lag` days after harvest; `dry_keep`:
    share of the canopy that stays standing as dry matter between senescence and harvest; `stubble`: residue
    cover after harvest until tillage. `a_vv`/`a_vh`: canopy volume backscatter per unit cover; `tau`: canopy
    attenuation of the soil return. `weight`: share of parcels.
    """

    name: str
    color: str
    kind: int
    weight: float
    emerge: float = -400.0
    base: float = 0.0
    peak: float = 0.0
    greenup: float = 0.0
    rg: float = 8.0
    senescence: float = 500.0
    rs: float = 8.0
    harvest: float = 500.0
    flower: float = 0.0
    flower_day: float = 0.0
    regrow: float = 0.0
    regrow_lag: float = 30.0
    dry_keep: float = 0.8
    stubble: float = 0.0
    a_vv: float = 0.05
    a_vh: float = 0.01
    tau: float = 0.3


# fmt: off
CLASSES: tuple[CropClass, ...] = (
    CropClass("winter_wheat", "#d4a017", CROP, 0.17, emerge=-45, base=0.30, peak=0.88, greenup=92, rg=9,
              senescence=184, rs=6, harvest=214, regrow=0.25, regrow_lag=40, dry_keep=0.85, stubble=0.35,
              a_vv=0.055, a_vh=0.014, tau=0.9),
    CropClass("winter_barley", "#8c564b", CROP, 0.10, emerge=-50, base=0.36, peak=0.82, greenup=80, rg=9,
              senescence=166, rs=6, harvest=190, regrow=0.25, regrow_lag=40, dry_keep=0.85, stubble=0.35,
              a_vv=0.050, a_vh=0.013, tau=0.8),
    CropClass("winter_rapeseed", "#ffff33", CROP, 0.09, emerge=-110, base=0.50, peak=0.86, greenup=72, rg=8,
              senescence=168, rs=7, harvest=196, flower=0.45, flower_day=118, regrow=0.40, regrow_lag=18,
              dry_keep=0.7, stubble=0.25, a_vv=0.110, a_vh=0.032, tau=0.4),
    CropClass("maize", "#ff7f0e", CROP, 0.15, base=0.0, peak=0.90, greenup=170, rg=8, senescence=258, rs=9,
              harvest=282, dry_keep=0.8, stubble=0.2, a_vv=0.090, a_vh=0.036, tau=0.5),
    CropClass("sugar_beet", "#9467bd", CROP, 0.09, base=0.0, peak=0.95, greenup=150, rg=7, senescence=310, rs=10,
              harvest=290, dry_keep=0.3, stubble=0.1, a_vv=0.140, a_vh=0.038, tau=0.3),
    CropClass("potato", "#e377c2", CROP, 0.09, base=0.0, peak=0.85, greenup=152, rg=6, senescence=215, rs=5,
              harvest=250, dry_keep=0.35, stubble=0.1, a_vv=0.120, a_vh=0.028, tau=0.35),
    CropClass("sunflower", "#bcbd22", CROP, 0.07, base=0.0, peak=0.80, greenup=140, rg=8, senescence=222, rs=8,
              harvest=262, dry_keep=0.95, stubble=0.3, a_vv=0.085, a_vh=0.026, tau=0.5),
    CropClass("grassland", "#2ca02c", GRASS, 0.15, base=0.50, peak=0.88, greenup=85, rg=15,
              a_vv=0.045, a_vh=0.010, tau=0.2),
    CropClass("non_crop", "#7f7f7f", NON_CROP, 0.09),
)
# fmt: on
NON_CROP_KINDS = (FOREST_KIND, URBAN_KIND, WATER_KIND)
NON_CROP_KIND_WEIGHTS = (0.45, 0.35, 0.20)
TIMING_FIELDS = ("emerge", "greenup", "senescence", "harvest", "flower_day")


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function, overflow-safe."""
    return 0.5 * (1.0 + np.tanh(0.5 * x))


@dataclass(frozen=True)
class ParcelPhenology:
    """Per-parcel phenology parameters (arrays of length n_parcels; `cuts` is (n, 4) mowing days, NaN = none)."""

    kind: np.ndarray
    params: dict[str, np.ndarray]
    cuts: np.ndarray
    a_vv: np.ndarray
    a_vh: np.ndarray
    tau: np.ndarray
    roughness: np.ndarray


def draw_parcel_phenology(class_ids: np.ndarray, rng: np.random.Generator) -> ParcelPhenology:
    """Class phenology with parcel-level variation: a common timing shift (sd 5 d, within +-10 d) plus
    stage jitter (sd 2.5 d), peak cover x U(0.88, 1.05), non-crop sub-kind (forest, built-up, water)."""
    n = len(class_ids)
    classes = [CLASSES[c] for c in class_ids]
    kind = np.array([c.kind for c in classes], dtype=np.int8)
    non_crop = kind == NON_CROP
    kind[non_crop] = rng.choice(NON_CROP_KINDS, size=int(non_crop.sum()), p=NON_CROP_KIND_WEIGHTS)
    fields = [f for f in CropClass.__dataclass_fields__ if f not in ("name", "color", "kind", "weight")]
    params = {f: np.array([getattr(c, f) for c in classes], dtype=np.float64) for f in fields}
    shift = np.clip(rng.normal(0.0, 5.0, n), -10.0, 10.0)
    for f in TIMING_FIELDS:
        params[f] = params[f] + shift + rng.normal(0.0, 2.5, n)
    amplitude = rng.uniform(0.88, 1.05, n)
    params["peak"] = np.minimum(params["peak"] * amplitude, 0.97)
    params["base"] = params["base"] * rng.uniform(0.8, 1.2, n)
    # Trees (forest, urban green): leaf-on around day 112, leaf-off around day 295.
    trees = np.isin(kind, (FOREST_KIND, URBAN_KIND))
    params["greenup"][trees] = 112 + shift[trees]
    params["senescence"][trees] = 295 + shift[trees]
    # Grassland: 2 to 4 cuts from mid-May, 35-60 days apart.
    cuts = np.full((n, 4), np.nan)
    grass = np.flatnonzero(kind == GRASS)
    n_cuts = rng.integers(2, 5, len(grass))
    first = rng.normal(140, 8, len(grass))
    gaps = rng.uniform(35, 60, (len(grass), 3))
    days = np.concatenate([first[:, None], first[:, None] + np.cumsum(gaps, axis=1)], axis=1)
    days[np.arange(4)[None, :] >= n_cuts[:, None]] = np.nan
    cuts[grass] = days
    a_vv = params.pop("a_vv")
    a_vh = params.pop("a_vh")
    tau = params.pop("tau")
    return ParcelPhenology(kind, params, cuts, a_vv, a_vh, tau, rng.uniform(0.7, 1.4, n))


def parcel_fractions(pheno: ParcelPhenology, day: float) -> np.ndarray:
    """Endmember fractions (n_parcels, N_ENDMEMBERS) of every parcel on `day`; rows sum to 1."""
    p = pheno.params
    n = len(pheno.kind)
    frac = np.zeros((n, N_ENDMEMBERS))
    emerged = sigmoid((day - p["emerge"]) / 8.0)
    canopy = p["base"] * emerged + (p["peak"] - p["base"]) * sigmoid((day - p["greenup"]) / p["rg"])
    senesced = sigmoid((day - p["senescence"]) / p["rs"])
    harvested = sigmoid((day - p["harvest"]) / 2.0)
    tilled = sigmoid((day - p["harvest"] - 25.0) / 4.0)
    regrowth = p["regrow"] * sigmoid((day - p["harvest"] - p["regrow_lag"]) / 8.0)
    flowers = p["flower"] * np.exp(-0.5 * ((day - p["flower_day"]) / 9.0) ** 2)
    crop_green = canopy * (1.0 - senesced) * (1.0 - harvested) + regrowth
    crop_dry = canopy * senesced * (1.0 - harvested) * p["dry_keep"] + p["stubble"] * harvested * (1.0 - tilled)

    since_cut = day - pheno.cuts
    cut_effect = np.where(since_cut >= 0, np.exp(-np.maximum(since_cut, 0) / 14.0), 0.0)
    hay = np.where(since_cut >= 0, np.exp(-np.maximum(since_cut, 0) / 5.0), 0.0)
    grass_green = canopy * (1.0 - np.minimum(0.6 * np.nansum(cut_effect, axis=1), 0.8))
    grass_dry = 0.3 * np.nansum(hay, axis=1)

    leaf_on = sigmoid((day - p["greenup"]) / 7.0) - sigmoid((day - p["senescence"]) / 8.0)
    kind = pheno.kind
    frac[:, GREEN] = np.select(
        [kind == CROP, kind == GRASS, kind == URBAN_KIND],
        [np.maximum(crop_green - flowers, 0.0), grass_green, 0.12 + 0.13 * leaf_on],
        0.0,
    )
    frac[:, DRY] = np.select([kind == CROP, kind == GRASS], [crop_dry, grass_dry], 0.0)
    frac[:, FLOWER] = np.where(kind == CROP, flowers, 0.0)
    frac[:, FOREST] = np.where(kind == FOREST_KIND, 0.15 + 0.8 * leaf_on, 0.0)
    frac[:, LITTER] = np.where(kind == FOREST_KIND, 0.85 - 0.8 * leaf_on, 0.0)
    frac[:, URBAN] = np.where(kind == URBAN_KIND, 0.75, 0.0)
    frac[:, WATER] = np.where(kind == WATER_KIND, 1.0, 0.0)
    cover = frac.sum(axis=1, keepdims=True)
    frac = frac / np.maximum(cover, 1.0)
    frac[:, SOIL] = 1.0 - frac.sum(axis=1)
    return frac


def soil_moisture(n_days: int, rng: np.random.Generator) -> np.ndarray:
    """Daily top-soil moisture index in [0, 1]: exponential drying with random rain events."""
    rain = (rng.random(n_days) < 0.3) * rng.exponential(0.15, n_days)
    m = np.empty(n_days)
    level = 0.5
    for i in range(n_days):
        level = min(1.0, 0.9 * level + rain[i])
        m[i] = level
    return m


def spectra_for(moisture: float) -> np.ndarray:
    """Endmember spectra (N_ENDMEMBERS, 12 bands) on a day with the given soil moisture (wet soil is darker)."""
    spectra = SPECTRA.copy()
    spectra[SOIL] *= 1.0 - moisture * SOIL_WETNESS_DARKENING
    return spectra


def backscatter(
    frac: np.ndarray, a_vv: np.ndarray, a_vh: np.ndarray, tau: np.ndarray, soil_vv: np.ndarray, water_vv: float
) -> tuple[np.ndarray, np.ndarray]:
    """Linear gamma0 (VV, VH) of pixels with endmember fractions `frac` (N_ENDMEMBERS, ...).

    Canopy volume scattering grows with vegetation cover; the soil return (`soil_vv`, per pixel, moisture and
    roughness dependent; VH = 0.18 x VV) is attenuated by the canopy; forest, built-up and water have their own
    returns.
    """
    canopy = frac[GREEN] + 0.7 * frac[DRY] + frac[FLOWER]
    attenuation = np.exp(-2.0 * tau * canopy)
    soil = frac[SOIL] * soil_vv * attenuation
    vv = a_vv * canopy + soil + 0.085 * frac[FOREST] + 0.05 * frac[LITTER] + 0.25 * frac[URBAN]
    vh = a_vh * canopy + 0.18 * soil + 0.022 * frac[FOREST] + 0.01 * frac[LITTER] + 0.03 * frac[URBAN]
    vv = vv + water_vv * frac[WATER]
    vh = vh + 0.15 * water_vv * frac[WATER]
    return vv, vh
