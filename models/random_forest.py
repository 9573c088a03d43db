"""Random Forest on per-pixel temporal features, behind the interface of the neural models.

Breiman, L. (2001). "Random forests". Machine Learning 45, 5-32; the per-pixel temporal features follow common
crop-mapping practice (values resampled on a fixed calendar plus per-band statistics of the season).

The forest is fitted by scikit-learn (`RandomForestClassifier`), once, with `fit`: it is not trained by gradient
descent and has no `nn.Parameter` (an optimizer over `parameters()` gets nothing to do). The fitted trees are then
exported to tensor buffers (children, split feature, threshold, leaf class frequencies), so that a checkpoint is a
plain `state_dict` loadable with `torch.load(weights_only=True)` (no pickle of scikit-learn objects, which could
run code from an untrusted file), and prediction walks the trees with tensor operations, on any device.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.ensemble import RandomForestClassifier
from torch import nn

from models.base import Count

BUFFERS = ("grid", "left", "right", "feature", "threshold", "leaf_proba")
PADDING = -3  # `feature` of the nodes that pad the shorter trees (scikit-learn marks leaves with -2)


def temporal_features(x: torch.Tensor, doy: torch.Tensor, valid: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Per-pixel features (B*H*W, G*C + 5*C + 1), float32, pixels in (B, H, W) order.

    - band values at the G days of year of `grid`, linearly interpolated in time between the valid observations
      around each grid day (the nearest valid one beyond the first or last);
    - per band, mean, standard deviation, 10th, 50th and 90th percentiles over the valid observations;
    - the fraction of valid dates.
    Invalid observations are never read. A pixel without a valid observation gets zeros.
    """
    b, t, c, h, w = x.shape
    values = x.float().permute(0, 3, 4, 1, 2).reshape(-1, t, c)  # (P, T, C)
    mask = valid.permute(0, 2, 3, 1).reshape(-1, t)  # (P, T)
    days = doy.float().reshape(b, 1, t).expand(b, h * w, t).reshape(-1, t)  # (P, T)

    g = grid.float().view(1, -1, 1)  # (1, G, 1)
    d, m = days.unsqueeze(1), mask.unsqueeze(1)  # (P, 1, T)
    inf = torch.tensor(float("inf"), device=x.device)
    prev_day, prev_idx = torch.where(m & (d <= g), d, -inf).max(dim=-1)  # (P, G)
    next_day, next_idx = torch.where(m & (d >= g), d, inf).min(dim=-1)
    has_prev, has_next = prev_day.isfinite(), next_day.isfinite()
    prev_val = values.gather(1, prev_idx.unsqueeze(-1).expand(-1, -1, c))  # (P, G, C)
    next_val = values.gather(1, next_idx.unsqueeze(-1).expand(-1, -1, c))
    span = (next_day - prev_day).clamp(min=1.0)
    frac = torch.where(has_prev & has_next, (grid.float().view(1, -1) - prev_day) / span, 0.0).clamp(0.0, 1.0)
    interp = prev_val + frac.unsqueeze(-1) * (next_val - prev_val)
    interp = torch.where(has_prev.unsqueeze(-1), interp, next_val)
    interp = torch.where((has_prev | has_next).unsqueeze(-1), interp, 0.0)

    observed = torch.where(mask.unsqueeze(-1), values, torch.nan).transpose(1, 2)  # (P, C, T), NaN if invalid
    count = mask.sum(dim=1, keepdim=True).float()  # (P, 1)
    mean = observed.nansum(-1) / count.clamp(min=1.0)
    std = ((observed - mean.unsqueeze(-1)).square().nansum(-1) / count.clamp(min=1.0)).sqrt()
    quantiles = torch.nanquantile(observed, torch.tensor([0.1, 0.5, 0.9], device=x.device), dim=-1)  # (3, P, C)
    stats = torch.cat([mean, std, *quantiles], dim=1).nan_to_num(0.0)
    return torch.cat([interp.flatten(1), stats, count / t], dim=1)


class RandomForest(nn.Module):
    """Random Forest classifier of every pixel from its temporal features (see `temporal_features`).

    `fit(x, doy, valid, target)` fits a scikit-learn forest on the labelled pixels (target >= 0) and exports it;
    `forward(x, doy, valid)` returns log class frequencies of the forest (mean of the trees' leaf frequencies,
    floored at 1e-6) as logits (B, K, H, W). The calendar grid spans the days of year seen by `fit`.

    Args:
        in_channels: C, bands per date.
        num_classes: K.
        n_estimators, max_depth, min_samples_leaf: the forest's (scikit-learn's meaning).
        n_grid: G, days of the calendar on which the band values are resampled.
        max_samples: fit on at most this many labelled pixels (a random subset).
        n_jobs: scikit-learn worker processes for fitting.
        seed: seed of the pixel subset and of the forest.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        n_estimators: Count = 100,
        max_depth: Count | None = None,
        min_samples_leaf: Count = 1,
        n_grid: Count = 12,
        max_samples: Count = 200_000,
        n_jobs: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.in_channels, self.num_classes, self.n_grid = in_channels, num_classes, n_grid
        self.forest_config = {
            "n_estimators": n_estimators,
            "max_depth": max_depth,
            "min_samples_leaf": min_samples_leaf,
            "n_jobs": n_jobs,
            "random_state": seed,
        }
        self.max_samples, self.seed = max_samples, seed
        for name in BUFFERS:
            self.register_buffer(name, torch.empty(0))

    @property
    def fitted(self) -> bool:
        return self.left.numel() > 0

    @property
    def num_nodes(self) -> int:
        """Tree nodes stored (padding of the shorter trees excluded)."""
        return int((self.feature != PADDING).sum())

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object, **kwargs: object) -> None:
        """Buffers take the size of the stored forest (unknown before `fit`)."""
        for name in BUFFERS:
            if prefix + name in state_dict:
                self._buffers[name] = torch.empty_like(state_dict[prefix + name], device=self.left.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def fit(self, x: torch.Tensor, doy: torch.Tensor, valid: torch.Tensor, target: torch.Tensor) -> RandomForest:
        """Fit on x (B, T, C, H, W), doy (B, T), valid (B, T, H, W) and target (B, H, W) (-1: unlabelled)."""
        labelled = (target >= 0).flatten().cpu()
        if not labelled.any():
            raise ValueError("no labelled pixel (target >= 0) to fit the forest on")
        days = doy[valid.any(dim=(2, 3))].float()  # days with at least one valid pixel
        self.grid = torch.linspace(days.min().item(), days.max().item(), self.n_grid, device=x.device)
        features = temporal_features(x, doy, valid, self.grid).cpu()[labelled].numpy()
        labels = target.flatten().cpu()[labelled].numpy()
        if len(labels) > self.max_samples:
            keep = np.random.default_rng(self.seed).choice(len(labels), self.max_samples, replace=False)
            features, labels = features[keep], labels[keep]
        forest = RandomForestClassifier(**self.forest_config).fit(features, labels)
        self._export(forest, x.device)
        return self

    def _export(self, forest: RandomForestClassifier, device: torch.device) -> None:
        """Trees as (n_trees, max_nodes) buffers; the padding nodes are never reached."""
        trees = [estimator.tree_ for estimator in forest.estimators_]
        n, size = len(trees), max(tree.node_count for tree in trees)
        left = np.full((n, size), -1, dtype=np.int64)
        right = np.full((n, size), -1, dtype=np.int64)
        feature = np.full((n, size), PADDING, dtype=np.int64)
        threshold = np.zeros((n, size), dtype=np.float64)
        leaf_proba = np.zeros((n, size, self.num_classes), dtype=np.float32)
        for i, tree in enumerate(trees):
            k = tree.node_count
            left[i, :k], right[i, :k] = tree.children_left, tree.children_right
            feature[i, :k], threshold[i, :k] = tree.feature, tree.threshold
            counts = tree.value[:, 0, :]  # (nodes, classes of the forest), class frequencies
            leaf_proba[i, :k][:, forest.classes_.astype(np.int64)] = counts / counts.sum(1, keepdims=True)
        for name, array in zip(BUFFERS[1:], (left, right, feature, threshold, leaf_proba), strict=True):
            setattr(self, name, torch.from_numpy(array).to(device))

    def _predict_proba(self, features: torch.Tensor) -> torch.Tensor:
        """Mean leaf class frequencies (P, K) of features (P, F): all trees walked at once."""
        n_trees = self.left.shape[0]
        node = torch.zeros((n_trees, features.shape[0]), dtype=torch.long, device=features.device)
        pixel = torch.arange(features.shape[0], device=features.device).expand_as(node)
        values = features.double()  # scikit-learn compares float32 features with float64 thresholds
        while True:
            left = self.left.gather(1, node)
            inner = left >= 0
            if not inner.any():
                break
            go_left = values[pixel, self.feature.gather(1, node).clamp(min=0)] <= self.threshold.gather(1, node)
            node = torch.where(inner, torch.where(go_left, left, self.right.gather(1, node)), node)
        tree = torch.arange(n_trees, device=node.device).unsqueeze(1)
        return self.leaf_proba[tree, node].mean(dim=0)

    @torch.no_grad()
    def forward(
        self, x: torch.Tensor, doy: torch.Tensor, valid: torch.Tensor | None = None, chunk: int = 65_536
    ) -> torch.Tensor:
        """Logits (B, K, H, W): log class frequencies of the forest, computed `chunk` pixels at a time."""
        if not self.fitted:
            raise RuntimeError("the random forest is not fitted: call fit(x, doy, valid, target) first")
        b, _, _, h, w = x.shape
        if valid is None:
            valid = torch.ones((b, x.shape[1], h, w), dtype=torch.bool, device=x.device)
        features = temporal_features(x, doy, valid, self.grid)
        proba = torch.cat([self._predict_proba(part) for part in features.split(chunk)])
        return proba.clamp(min=1e-6).log().view(b, h, w, -1).permute(0, 3, 1, 2)
