"""``fid``: Fréchet Inception Distance between generated and reference images.

Definition (version 2): 2048-d pool features of the FID Inception-v3 (the TensorFlow
2015-12-05 graph ported to PyTorch, weights file ``pt_inception-2015-12-05-*.pth`` as
pytorch-fid and torchmetrics use; ``inception_path``). Images are converted to RGB, resized to
299×299 bilinearly and scaled to [-1, 1]. FID = ‖μ₁−μ₂‖² + tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½) with
unbiased covariances and scipy's matrix square root in float64 (imaginary residue dropped, a
1e-6 diagonal offset when the product is singular, as pytorch-fid does). The network is
written here (no torchvision dependency) with the FID port's differences from torchvision's
Inception: average pools that exclude padding, and a max pool in the last block's pool branch.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from ...errors import UserError
from .base import EvalImage, Metric, MetricValue, register_metric, require_files

WHERE = (
    "inception_path: the FID Inception-v3 weights pt_inception-2015-12-05-6726825d.pth (the file "
    "pytorch-fid downloads from github.com/mseitzer/pytorch-fid/releases); reference: an "
    "imagefolder dataset of real images"
)


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = 1e-6) -> float:
    """Fréchet distance between two Gaussians (float64)."""
    import numpy as np
    from scipy import linalg

    mu1, mu2 = (
        np.atleast_1d(np.asarray(mu1, np.float64)),
        np.atleast_1d(np.asarray(mu2, np.float64)),
    )
    s1, s2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    diff = mu1 - mu2
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = np.real(covmean)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def fid_from_features(f1: Any, f2: Any) -> float:
    """FID of two feature sets ``[N, D]`` (unbiased covariances, float64).

    With fewer images than feature dimensions on both sides (N ≤ D: a rehearsal, a smoke
    test) both covariances are low-rank and the trace term is computed exactly in sample
    space: with centred features A₁, A₂, tr((Σ₁Σ₂)^½) = ‖A₁A₂ᵀ‖_* / √((N₁−1)(N₂−1)) (the
    nonzero eigenvalues of Σ₁Σ₂ are the squared singular values of A₁A₂ᵀ over (N₁−1)(N₂−1)).
    That replaces scipy's sqrtm of a singular 2048² product, which takes 15–45 s here per call
    and warns that its result is inaccurate. Otherwise: :func:`gaussian_stats` +
    :func:`frechet_distance`, as pytorch-fid."""
    import numpy as np

    a1, a2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    n1, n2, d = a1.shape[0], a2.shape[0], a1.shape[1]
    if max(n1, n2) > d:
        return frechet_distance(*gaussian_stats(a1), *gaussian_stats(a2))
    for n in (n1, n2):
        if n < 2:
            raise UserError(f"FID needs at least 2 images per side, got {n}")
    mu1, mu2 = a1.mean(axis=0), a2.mean(axis=0)
    c1, c2 = a1 - mu1, a2 - mu2
    diff = mu1 - mu2
    tr1 = float((c1 * c1).sum()) / (n1 - 1)
    tr2 = float((c2 * c2).sum()) / (n2 - 1)
    nuclear = float(np.linalg.svd(c1 @ c2.T, compute_uv=False).sum())
    return float(diff @ diff + tr1 + tr2 - 2.0 * nuclear / np.sqrt((n1 - 1) * (n2 - 1)))


def gaussian_stats(features: Any) -> tuple[Any, Any]:
    """Mean and unbiased covariance of [N, D] features (float64)."""
    import numpy as np

    f = np.asarray(features, np.float64)
    if f.shape[0] < 2:
        raise UserError(f"FID needs at least 2 images per side, got {f.shape[0]}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _build_inception() -> Any:
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Conv(nn.Module):
        def __init__(self, cin: int, cout: int, k: Any, s: int = 1, p: Any = 0):
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, k, stride=s, padding=p, bias=False)
            self.bn = nn.BatchNorm2d(cout, eps=0.001)

        def forward(self, x: Any) -> Any:
            return F.relu(self.bn(self.conv(x)))

    def avg(x: Any) -> Any:
        return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

    class A(nn.Module):
        def __init__(self, cin: int, pool: int):
            super().__init__()
            self.branch1x1 = Conv(cin, 64, 1)
            self.branch5x5_1, self.branch5x5_2 = Conv(cin, 48, 1), Conv(48, 64, 5, p=2)
            self.branch3x3dbl_1 = Conv(cin, 64, 1)
            self.branch3x3dbl_2, self.branch3x3dbl_3 = Conv(64, 96, 3, p=1), Conv(96, 96, 3, p=1)
            self.branch_pool = Conv(cin, pool, 1)

        def forward(self, x: Any) -> Any:
            return torch.cat(
                [
                    self.branch1x1(x),
                    self.branch5x5_2(self.branch5x5_1(x)),
                    self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                    self.branch_pool(avg(x)),
                ],
                1,
            )

    class B(nn.Module):
        def __init__(self, cin: int):
            super().__init__()
            self.branch3x3 = Conv(cin, 384, 3, s=2)
            self.branch3x3dbl_1 = Conv(cin, 64, 1)
            self.branch3x3dbl_2, self.branch3x3dbl_3 = Conv(64, 96, 3, p=1), Conv(96, 96, 3, s=2)

        def forward(self, x: Any) -> Any:
            return torch.cat(
                [
                    self.branch3x3(x),
                    self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                    F.max_pool2d(x, 3, stride=2),
                ],
                1,
            )

    class C(nn.Module):
        def __init__(self, cin: int, c7: int):
            super().__init__()
            r, c = ((1, 7), (0, 3)), ((7, 1), (3, 0))
            self.branch1x1 = Conv(cin, 192, 1)
            self.branch7x7_1 = Conv(cin, c7, 1)
            self.branch7x7_2, self.branch7x7_3 = (
                Conv(c7, c7, r[0], p=r[1]),
                Conv(c7, 192, c[0], p=c[1]),
            )
            self.branch7x7dbl_1 = Conv(cin, c7, 1)
            self.branch7x7dbl_2 = Conv(c7, c7, c[0], p=c[1])
            self.branch7x7dbl_3 = Conv(c7, c7, r[0], p=r[1])
            self.branch7x7dbl_4 = Conv(c7, c7, c[0], p=c[1])
            self.branch7x7dbl_5 = Conv(c7, 192, r[0], p=r[1])
            self.branch_pool = Conv(cin, 192, 1)

        def forward(self, x: Any) -> Any:
            d = self.branch7x7dbl_1(x)
            for m in (
                self.branch7x7dbl_2,
                self.branch7x7dbl_3,
                self.branch7x7dbl_4,
                self.branch7x7dbl_5,
            ):
                d = m(d)
            return torch.cat(
                [
                    self.branch1x1(x),
                    self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
                    d,
                    self.branch_pool(avg(x)),
                ],
                1,
            )

    class D(nn.Module):
        def __init__(self, cin: int):
            super().__init__()
            self.branch3x3_1, self.branch3x3_2 = Conv(cin, 192, 1), Conv(192, 320, 3, s=2)
            self.branch7x7x3_1 = Conv(cin, 192, 1)
            self.branch7x7x3_2 = Conv(192, 192, (1, 7), p=(0, 3))
            self.branch7x7x3_3 = Conv(192, 192, (7, 1), p=(3, 0))
            self.branch7x7x3_4 = Conv(192, 192, 3, s=2)

        def forward(self, x: Any) -> Any:
            b = self.branch7x7x3_1(x)
            for m in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
                b = m(b)
            return torch.cat(
                [self.branch3x3_2(self.branch3x3_1(x)), b, F.max_pool2d(x, 3, stride=2)], 1
            )

    class E(nn.Module):
        def __init__(self, cin: int, max_pool: bool):
            super().__init__()
            self.max_pool = max_pool
            self.branch1x1 = Conv(cin, 320, 1)
            self.branch3x3_1 = Conv(cin, 384, 1)
            self.branch3x3_2a = Conv(384, 384, (1, 3), p=(0, 1))
            self.branch3x3_2b = Conv(384, 384, (3, 1), p=(1, 0))
            self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(cin, 448, 1), Conv(448, 384, 3, p=1)
            self.branch3x3dbl_3a = Conv(384, 384, (1, 3), p=(0, 1))
            self.branch3x3dbl_3b = Conv(384, 384, (3, 1), p=(1, 0))
            self.branch_pool = Conv(cin, 192, 1)

        def forward(self, x: Any) -> Any:
            b = self.branch3x3_1(x)
            d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg(x)
            return torch.cat(
                [
                    self.branch1x1(x),
                    self.branch3x3_2a(b),
                    self.branch3x3_2b(b),
                    self.branch3x3dbl_3a(d),
                    self.branch3x3dbl_3b(d),
                    self.branch_pool(pool),
                ],
                1,
            )

    class FidInception(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.Conv2d_1a_3x3 = Conv(3, 32, 3, s=2)
            self.Conv2d_2a_3x3 = Conv(32, 32, 3)
            self.Conv2d_2b_3x3 = Conv(32, 64, 3, p=1)
            self.Conv2d_3b_1x1 = Conv(64, 80, 1)
            self.Conv2d_4a_3x3 = Conv(80, 192, 3)
            self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = A(192, 32), A(256, 64), A(288, 64)
            self.Mixed_6a = B(288)
            self.Mixed_6b, self.Mixed_6c = C(768, 128), C(768, 160)
            self.Mixed_6d, self.Mixed_6e = C(768, 160), C(768, 192)
            self.Mixed_7a = D(768)
            self.Mixed_7b, self.Mixed_7c = E(1280, max_pool=False), E(2048, max_pool=True)

        def forward(self, x: Any) -> Any:
            """[N, 3, H, W] in [0, 1] → [N, 2048] pool features."""
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            x = 2 * x - 1
            x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
            x = F.max_pool2d(x, 3, stride=2)
            x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
            for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
                x = getattr(self, f"Mixed_{name}")(x)
            return F.adaptive_avg_pool2d(x, 1).flatten(1)

    return FidInception()


@lru_cache(maxsize=1)
def load_inception(path: str) -> Any:
    """The FID Inception network with the weights at ``path`` (read with weights_only)."""
    import torch

    require_files({"inception_path": path}, "fid", WHERE)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # an unreadable file is the user's to replace
        raise UserError(f"cannot read the FID Inception weights {path}: {exc}") from exc
    sentinel = "Mixed_7c.branch_pool.conv.weight"
    if not isinstance(state, dict) or sentinel not in state:
        raise UserError(f"{path} is not the FID Inception-v3 weights (no {sentinel})", hint=WHERE)
    net = _build_inception()
    own = net.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise UserError(
            f"{path} is not the FID Inception-v3 weights: {len(missing)} tensors missing "
            f"(e.g. {missing[:3]})",
            hint=WHERE,
        )
    net.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return net.eval()


def inception_features(path: str, images: Sequence[Any], batch_size: int = 16) -> Any:
    """[N, 2048] float64 FID features of PIL images."""
    import numpy as np
    import torch

    net = load_inception(path)
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            arr = np.stack(
                [
                    np.asarray(im.convert("RGB"), np.float32) / 255.0
                    for im in images[i : i + batch_size]
                ]
            )
            out.append(net(torch.from_numpy(arr).permute(0, 3, 1, 2)).double().numpy())
    return np.concatenate(out)


@register_metric
class Fid(Metric):
    id = "fid"
    # 2: with N ≤ 2048 images per side the trace term is exact in sample space
    # (fid_from_features); values with more images are unchanged.
    version = "2"

    def params(self) -> dict[str, Any]:
        return {
            "prompts": self.spec.get("prompts"),
            "reference": self.spec.get("reference"),
            "inception_path": str(self.spec["inception_path"]),
            "features": "FID Inception-v3 pool3 (2048-d), bilinear resize to 299",
        }

    def check(self) -> None:
        require_files({"inception_path": self.spec["inception_path"]}, self.id, WHERE)

    def compute(self, images: Sequence[EvalImage]) -> list[MetricValue]:
        from PIL import Image

        self.check()
        reference = self.context.get("reference_images")
        if not reference:
            raise UserError(f"fid: the reference data set {self.spec.get('reference')!r} is empty")
        path = str(self.spec["inception_path"])
        gen = inception_features(path, [Image.open(im.path) for im in images])
        ref = inception_features(path, list(reference))
        value = fid_from_features(gen, ref)
        return [
            self.value(
                "fid",
                value,
                role="utility",
                better="lower",
                n=len(images),
                extra={"reference_n": len(reference)},
            )
        ]
