"""Accuracy metrics against hand-computed values, ignore/no-data handling and the written reports."""

from __future__ import annotations

import csv
import json

import geopandas as gpd
import matplotlib.image as mpimg
import numpy as np
import pytest
import rasterio
import xarray as xr
from affine import Affine
from shapely.geometry import box

from infra.errors import CropflowError
from tasks.evaluate import (
    accuracy_metrics,
    area_adjusted_accuracy,
    confusion_matrix,
    evaluate_map,
    evaluate_map_task,
    metrics_markdown,
    publish_metrics_markdown,
)

# rows = truth, columns = prediction; class "d" is neither in the truth nor predicted
CM = np.array([[5, 1, 0, 0], [2, 3, 1, 0], [0, 0, 4, 0], [0, 0, 0, 0]])
NAMES = ["a", "b", "c", "d"]
CLASSES = [{"id": i, "name": n, "color": "#000000"} for i, n in enumerate(NAMES)]


def _pairs(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel arrays (truth, pred) whose confusion matrix is `cm`."""
    t, p = np.nonzero(cm)
    counts = cm[t, p]
    return np.repeat(t, counts), np.repeat(p, counts)


def test_confusion_matrix_counts_and_ignore():
    truth, pred = _pairs(CM)
    # ignored pixels: unlabelled truth, and a prediction marked ignore
    truth = np.concatenate([truth, [-1, -1, 2]])
    pred = np.concatenate([pred, [0, 3, -1]])
    cm = confusion_matrix(truth.reshape(1, -1), pred.reshape(1, -1), 4)
    np.testing.assert_array_equal(cm, CM)
    assert cm.dtype == np.int64
    cm255 = confusion_matrix(np.array([0, 1, 255]), np.array([1, 1, 0]), 2, ignore=255)
    np.testing.assert_array_equal(cm255, [[0, 1], [0, 1]])
    with pytest.raises(ValueError, match=r"outside 0\.\.3"):
        confusion_matrix(np.array([0, 4]), np.array([0, 0]), 4)
    with pytest.raises(ValueError, match="prediction holds"):
        confusion_matrix(np.array([0, 1]), np.array([0, 255]), 4)


def test_metrics_match_hand_computation():
    m = accuracy_metrics(CM, NAMES)
    # n = 16, diagonal 12; row sums 6 6 4 0, column sums 7 4 5 0
    assert m["n_pixels"] == 16
    assert m["overall_accuracy"] == pytest.approx(12 / 16)
    pe = (6 * 7 + 6 * 4 + 4 * 5) / 16**2
    assert m["kappa"] == pytest.approx((12 / 16 - pe) / (1 - pe))
    assert m["kappa"] == pytest.approx(53 / 85)
    a, b, c = (m["per_class"][k] for k in "abc")
    assert (a["precision"], a["recall"], a["f1"], a["iou"]) == pytest.approx((5 / 7, 5 / 6, 10 / 13, 5 / 8))
    assert (b["precision"], b["recall"], b["f1"], b["iou"]) == pytest.approx((3 / 4, 3 / 6, 6 / 10, 3 / 7))
    assert (c["precision"], c["recall"], c["f1"], c["iou"]) == pytest.approx((4 / 5, 4 / 4, 8 / 9, 4 / 5))
    assert a["support"] == 6 and a["predicted"] == 7
    # the absent class has no scores and is left out of the macro averages
    assert m["per_class"]["d"]["f1"] is None and m["per_class"]["d"]["iou"] is None
    assert m["excluded_from_macro"] == ["d"]
    assert m["macro_f1"] == pytest.approx((10 / 13 + 6 / 10 + 8 / 9) / 3)
    assert m["miou"] == pytest.approx((5 / 8 + 3 / 7 + 4 / 5) / 3)


def test_metrics_of_a_class_never_predicted_and_degenerate_cases():
    m = accuracy_metrics(np.array([[3, 0], [2, 0]]), ["x", "y"])
    y = m["per_class"]["y"]
    assert y["precision"] is None and y["recall"] == 0 and y["f1"] == 0 and y["iou"] == 0
    assert m["excluded_from_macro"] == [] and m["macro_f1"] == pytest.approx((6 / 8 + 0) / 2)
    assert m["kappa"] == pytest.approx(0.0)
    # one class everywhere, always right: chance agreement is 1 and kappa undefined
    assert accuracy_metrics(np.array([[4, 0], [0, 0]]), ["x", "y"])["kappa"] is None
    with pytest.raises(ValueError, match="empty"):
        accuracy_metrics(np.zeros((2, 2)), ["x", "y"])


def test_evaluate_map_scores_the_test_split_and_writes_reports(tmp_path):
    truth, pred = _pairs(CM)
    n = truth.size
    # test pixels (split 3) carry the matrix above; other splits, unlabelled and no-data pixels must not count
    target = np.concatenate([truth, [0, 1, -1, 2, 1]]).astype(np.int16)
    class_map = np.concatenate([pred, [1, 0, 0, 255, 255]]).astype(np.uint8)
    split = np.concatenate([np.full(n, 3), [1, 2, 3, 3, 1]]).astype(np.uint8)
    shape = (3, (n + 5) // 3)
    m = evaluate_map(class_map.reshape(shape), target.reshape(shape), split.reshape(shape), CLASSES, tmp_path)
    assert m["split"] == "test" and m["unmapped_pixels"] == 1 and m["n_pixels"] == n
    assert m["confusion_matrix"] == CM.tolist() and m["kappa"] == pytest.approx(53 / 85)
    assert json.loads((tmp_path / "metrics.json").read_text()) == m
    rows = list(csv.reader((tmp_path / "confusion_matrix.csv").open()))
    assert rows[0] == ["truth \\ prediction", *NAMES]
    assert rows[2] == ["b", "2", "3", "1", "0"]
    img = mpimg.imread(tmp_path / "confusion_matrix.png")
    assert img.shape[0] > 200 and img[..., :3].std() > 0.05
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["confusion_matrix.csv", "confusion_matrix.png", "metrics.json"]
    # strata weights come from the whole map (every split, no-data left out), the sample from the test pixels
    area = m["area_adjusted"]
    assert [c["mapped_area_ha"] for c in area["per_class"].values()] == pytest.approx([0.09, 0.05, 0.05, 0.0])
    assert [c["n_samples"] for c in area["per_class"].values()] == [7, 4, 5, 0]
    assert area["per_class"]["a"]["users_accuracy"] == pytest.approx(5 / 7)
    assert "not a probability sample" in area["sample"] and area["unsampled_strata"] == []
    # a probability sample given by the caller replaces the test pixels (here: every stratum perfectly right)
    sample = np.diag([3, 3, 3, 0])
    m2 = evaluate_map(
        class_map.reshape(shape),
        target.reshape(shape),
        split.reshape(shape),
        CLASSES,
        tmp_path,
        pixel_area_ha=2.0,
        sample=sample,
    )
    a2 = m2["area_adjusted"]
    assert a2["overall_accuracy"] == pytest.approx(1.0) and a2["sample"].startswith("probability sample")
    assert a2["per_class"]["a"]["area_ha"] == pytest.approx(18.0) and a2["total_area_ha"] == pytest.approx(38.0)
    assert m2["confusion_matrix"] == CM.tolist()
    with pytest.raises(CropflowError, match="no labelled pixel"):
        evaluate_map(class_map.reshape(shape), target.reshape(shape), np.zeros(shape, np.uint8), CLASSES, tmp_path)


@pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning")
def test_evaluate_map_task_burns_labels_on_the_cube_grid(tmp_path):
    """The COG is scored on test parcels rasterized on the cube grid; a map on another grid is refused."""
    x0, y0, n = 600_000.0, 5_000_000.0, 30
    cube = xr.Dataset(
        coords={"y": y0 - 5 - 10 * np.arange(n), "x": x0 + 5 + 10 * np.arange(n)},
        attrs={"crs": "EPSG:32631", "resolution": 10.0},
    )
    cube.to_zarr(tmp_path / "cube.zarr", zarr_format=3, consolidated=True)
    (tmp_path / "classes.json").write_text(json.dumps({"nodata": 255, "classes": CLASSES}))
    # parcels (rows/cols in px): a test parcel of class 0, a test parcel of class 2, a train parcel of class 1
    parcels = [((0, 0, 10, 10), 0, "test"), ((10, 0, 20, 10), 2, "test"), ((0, 15, 10, 25), 1, "train")]
    gpd.GeoDataFrame(
        {"parcel_id": [1, 2, 3], "class_id": [c for _, c, _ in parcels], "split": [s for _, _, s in parcels]},
        geometry=[box(x0 + 10 * c0, y0 - 10 * r1, x0 + 10 * c1, y0 - 10 * r0) for (r0, c0, r1, c1), _, _ in parcels],
        crs="EPSG:32631",
    ).to_parquet(tmp_path / "labels.parquet")
    class_map = np.full((n, n), 1, dtype=np.uint8)
    class_map[:10, :10] = 0  # the class-0 parcel is right, the class-2 parcel is mapped as 1
    profile = {
        "driver": "GTiff",
        "width": n,
        "height": n,
        "count": 1,
        "dtype": "uint8",
        "crs": "EPSG:32631",
        "transform": Affine(10, 0, x0, 0, -10, y0),
        "nodata": 255,
    }
    with rasterio.open(tmp_path / "map.tif", "w", **profile) as dst:
        dst.write(class_map, 1)
    out = tmp_path / "out"
    args = (tmp_path / "cube.zarr", tmp_path / "labels.parquet", tmp_path / "classes.json", out)
    m = evaluate_map_task.fn(tmp_path / "map.tif", *args)
    # 1 px parcel borders are unlabelled except along the region's edge: 9 x 9 and 9 x 8 scored pixels
    assert m["confusion_matrix"][0][0] == 81 and m["confusion_matrix"][2][1] == 72 and m["n_pixels"] == 153
    assert m["overall_accuracy"] == pytest.approx(81 / 153) and (out / "metrics.json").exists()
    shifted = profile | {"transform": Affine(10, 0, x0 + 10, 0, -10, y0)}
    with rasterio.open(tmp_path / "shifted.tif", "w", **shifted) as dst:
        dst.write(class_map, 1)
    with pytest.raises(CropflowError, match="not on the grid of the cube"):
        evaluate_map_task.fn(tmp_path / "shifted.tif", *args)


# Olofsson et al. (2014), section 5 (numerical example): Landsat pixels (0.09 ha), four map strata
OLOFSSON_CLASSES = ["deforestation", "forest gain", "stable forest", "stable non-forest"]
OLOFSSON_MAPPED = np.array([200_000, 150_000, 3_200_000, 6_450_000])
OLOFSSON_COUNTS = np.array([[66, 0, 5, 4], [0, 55, 8, 12], [1, 0, 153, 11], [2, 1, 9, 313]])  # rows = map, as printed


def test_area_estimator_matches_olofsson_worked_example():
    """Olofsson et al. 2014, section 5: error matrix of sample counts (their table 8, rows = map) and mapped areas.

    Published figures checked at their printed precision: area of deforestation 21,158 ± 6,158 ha and of forest
    gain 11,686 ± 3,756 ha (95 % CI), user's accuracies 0.88, 0.73, 0.93, 0.96, producer's accuracies 0.75, 0.85,
    0.93, 0.96, overall accuracy 0.95. Derived here by hand from their equations (not quoted from the paper):
    the area proportions p_ij = W_i n_ij / n_i. (e.g. p_11 = 0.02 x 66 / 75 = 0.0176, p_.1 = 0.0235086) and the
    standard errors: S(p_.1) = sqrt(0.02^2 0.88 0.12 / 74 + 0.32^2 (1/165)(164/165) / 164
    + 0.645^2 (2/325)(323/325) / 324) = 0.0034907, i.e. 3,141.7 ha; S(U_1) = sqrt(0.88 x 0.12 / 74) = 0.03778;
    S(O) = 0.009430; S(P_1) = 0.10883 (their eq. 7, i.e. ± 0.21 at 95 %).
    """
    est = area_adjusted_accuracy(OLOFSSON_COUNTS.T, OLOFSSON_MAPPED, OLOFSSON_CLASSES, pixel_area_ha=0.09)
    c = est["per_class"]
    assert est["total_area_ha"] == pytest.approx(900_000) and est["n_samples"] == 640
    assert round(c["deforestation"]["area_ha"]) == 21_158 and round(c["deforestation"]["area_ci95_ha"]) == 6_158
    assert round(c["forest gain"]["area_ha"]) == 11_686 and round(c["forest gain"]["area_ci95_ha"]) == 3_756
    assert [round(c[k]["users_accuracy"], 2) for k in OLOFSSON_CLASSES] == [0.88, 0.73, 0.93, 0.96]
    assert [round(c[k]["producers_accuracy"], 2) for k in OLOFSSON_CLASSES] == [0.75, 0.85, 0.93, 0.96]
    assert round(est["overall_accuracy"], 2) == 0.95
    # hand-derived values, to more digits than printed in the paper
    p = np.array(est["area_proportions"])  # rows = reference, columns = map
    assert p[0, 0] == pytest.approx(0.0176) and p[0, 2] == pytest.approx(0.32 / 165)
    assert p[3, 2] == pytest.approx(0.32 * 11 / 165) and p.sum() == pytest.approx(1.0)
    assert p[0].sum() == pytest.approx(0.0235086, abs=1e-7)
    assert est["overall_accuracy"] == pytest.approx(0.0176 + 0.011 + 0.32 * 153 / 165 + 0.645 * 313 / 325)
    assert c["deforestation"]["area_se_ha"] == pytest.approx(3141.7, abs=0.1)
    assert c["deforestation"]["users_accuracy_se"] == pytest.approx(0.03778, abs=1e-5)
    assert c["deforestation"]["producers_accuracy_se"] == pytest.approx(0.10883, abs=1e-5)
    assert est["overall_accuracy_se"] == pytest.approx(0.009430, abs=1e-6)
    # the estimated areas add up to the mapped area
    assert sum(v["area_ha"] for v in c.values()) == pytest.approx(900_000)


def test_area_estimator_undefined_cases():
    # stratum "y" is mapped but never sampled: only the user's accuracy of "x" can be estimated
    est = area_adjusted_accuracy(np.array([[4, 0], [1, 0]]), np.array([50, 50]), ["x", "y"], pixel_area_ha=1.0)
    assert est["unsampled_strata"] == ["y"] and est["overall_accuracy"] is None
    assert est["per_class"]["x"]["users_accuracy"] == pytest.approx(0.8) and est["per_class"]["x"]["area_ha"] is None
    # a stratum of a single sample has estimates but no variance; an unmapped, unsampled class weighs nothing
    est = area_adjusted_accuracy(np.array([[1, 0, 0], [0, 5, 0], [0, 0, 0]]), [30, 70, 0], ["x", "y", "z"], 1.0)
    assert est["overall_accuracy"] == pytest.approx(1.0) and est["overall_accuracy_se"] is None
    assert est["per_class"]["y"]["users_accuracy_se"] == pytest.approx(0.0)
    assert est["per_class"]["x"]["area_ha"] == pytest.approx(30.0) and est["per_class"]["z"]["area_ha"] == 0.0
    with pytest.raises(ValueError, match="do not match"):
        area_adjusted_accuracy(np.eye(2), [1, 1, 1], ["x", "y"], 1.0)
    with pytest.raises(ValueError, match="some mapped pixels"):
        area_adjusted_accuracy(np.eye(2), [0, 0], ["x", "y"], 1.0)


def test_metrics_markdown_tables_and_no_artifact_outside_a_run():
    cm = OLOFSSON_COUNTS.T
    metrics = {"split": "test", **accuracy_metrics(cm, OLOFSSON_CLASSES)}
    metrics["area_adjusted"] = area_adjusted_accuracy(cm, OLOFSSON_MAPPED, OLOFSSON_CLASSES, 0.09) | {"sample": "s"}
    text = metrics_markdown(metrics)
    assert "| overall accuracy | kappa | macro-F1 | mIoU |" in text and "(640 pixels)" in text
    assert "| deforestation | 69 | 0.880 | 0.957 |" in text  # support 69 = column sum of the paper's table
    assert "| deforestation | 18,000.0 | 21,157.8 | 6,157.5 | 0.880 ± 0.038 | 0.749 ± 0.109 |" in text
    assert "Overall accuracy 0.947 ± 0.009 (SE)" in text
    assert publish_metrics_markdown(metrics) is False
