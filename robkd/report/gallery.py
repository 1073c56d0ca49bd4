"""The samples the student lost, read from ``samples.safetensors``: thumbnails for the report's gallery.

A lost sample is robust for the teacher and broken for the student at the largest audited radius
(``teacher.robust[-1] & ~student.robust[-1]``, the samples of ``transfer.lost``). Its clean image is the
teacher's ``x_adv`` (for a sample no attack broke, the stored example is the clean image), its adversarial
image the student's ``x_adv`` (found at ``student.adv_radius``), its prediction there ``student.adv_pred``
(absent in files written before it was stored). Reading needs numpy, safetensors and pillow, never torch;
a missing, unreadable or mismatched file gives a :class:`Gallery` with a ``note`` instead of samples.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
from pathlib import Path
from typing import Any

from robkd.report.escape import esc_text
from robkd.report.schema import SAMPLES_FILE, Results

log = logging.getLogger(__name__)

#: at most this many lost samples are shown (the first ones in audit order)
GALLERY_MAX = 8
#: thumbnail edge in pixels (small images are enlarged by a whole factor, large ones shrunk)
THUMB = 96
_GAP = 6


@dataclasses.dataclass(frozen=True)
class LostSample:
    """One lost sample: ``position`` in audit order, ``index`` in the dataset split; ``adv_radius`` None when
    the student misclassifies it without any perturbation; ``adv_pred`` None when not stored."""

    position: int
    index: int
    label: int
    clean_pred: int
    adv_pred: int | None
    adv_radius: float | None
    amplification: float | None  # factor applied to the perturbation in the third panel (None: no perturbation)
    png: bytes  # clean | adversarial | amplified perturbation, side by side


@dataclasses.dataclass(frozen=True)
class Gallery:
    """The lost samples at ``radius`` (``total`` of them, the first ``len(samples)`` shown) or why none can
    be shown (``note``)."""

    radius: float
    total: int
    samples: list[LostSample]
    note: str | None = None


def lost_gallery(res: Results, path: str | Path | None, limit: int = GALLERY_MAX) -> Gallery | None:
    """The gallery of the result ``res`` from its samples file ``path``; None when the result has no radius."""
    radii = res.radii
    if not radii:
        return None
    radius = radii[-1]
    p = Path(path) if path is not None else None
    if p is None or not p.is_file():
        return Gallery(radius, 0, [], f"No per-sample file ({SAMPLES_FILE}) was found beside the results, so the lost "
                                      "samples cannot be shown (robkd audit --out DIR writes it; keep it beside results.json).")
    try:
        return _read(res, p, radius, limit)
    except _Mismatch as exc:
        return Gallery(radius, 0, [], f"{SAMPLES_FILE} does not belong to these results ({exc}); the gallery is left out.")
    except Exception as exc:  # noqa: BLE001 - a hostile or corrupt file must never break the report
        why = esc_text(f"{type(exc).__name__}: {exc}", keep="")[:200]
        log.warning("cannot read %s: %s", esc_text(p, keep=""), why)
        return Gallery(radius, 0, [], f"{SAMPLES_FILE} could not be read ({why}); the gallery is left out.")


class _Mismatch(ValueError):
    """The samples file disagrees with results.json."""


def lost_positions(teacher_robust: Any, student_robust: Any) -> Any:
    """Positions (audit order) of the samples robust for the teacher and broken for the student."""
    import numpy as np

    return np.flatnonzero(np.asarray(teacher_robust, dtype=bool) & ~np.asarray(student_robust, dtype=bool))


def _read(res: Results, path: Path, radius: float, limit: int) -> Gallery:
    import numpy as np
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        keys = set(f.keys())
        need = {"indices", "labels", "teacher.robust", "student.robust", "teacher.x_adv", "student.x_adv",
                "student.clean_pred", "student.adv_radius"}
        missing = sorted(need - keys)
        if missing:
            raise _Mismatch(f"it has no {', '.join(missing)}")
        labels = np.asarray(f.get_tensor("labels"))
        n = int(labels.shape[0])
        expected_n = res.teacher.clean.n
        if expected_n is not None and expected_n != n:
            raise _Mismatch(f"{n} samples, results.json has {expected_n}")
        rt, rs = np.asarray(f.get_tensor("teacher.robust")), np.asarray(f.get_tensor("student.robust"))
        if rt.shape != (len(res.radii), n) or rs.shape != rt.shape:
            raise _Mismatch(f"robustness of shape {tuple(rt.shape)}, expected ({len(res.radii)}, {n})")
        lost = lost_positions(rt[-1], rs[-1])
        transfer = res.transfer
        k = transfer[-1].lost.k if len(transfer) == len(res.radii) else None
        if k is not None and k != len(lost):
            raise _Mismatch(f"{len(lost)} lost samples, results.json counts {k}")
        indices = np.asarray(f.get_tensor("indices"))
        clean_pred = np.asarray(f.get_tensor("student.clean_pred"))
        adv_radius = np.asarray(f.get_tensor("student.adv_radius"), dtype=np.float64)
        adv_pred = np.asarray(f.get_tensor("student.adv_pred")) if "student.adv_pred" in keys else None
        t_radius = np.asarray(f.get_tensor("teacher.adv_radius"), dtype=np.float64) if "teacher.adv_radius" in keys else None
        xt, xs = f.get_slice("teacher.x_adv"), f.get_slice("student.x_adv")
        samples = []
        for pos in (int(i) for i in lost[: max(int(limit), 0)]):
            if t_radius is not None and math.isfinite(float(t_radius[pos])):
                raise _Mismatch(f"the teacher's stored example of sample {pos} is not its clean image")
            clean = np.asarray(xt[pos : pos + 1], dtype=np.float64)[0]
            adv = np.asarray(xs[pos : pos + 1], dtype=np.float64)[0]
            r = float(adv_radius[pos])
            png, amp = sample_png(clean, adv)
            samples.append(LostSample(
                position=pos, index=int(indices[pos]), label=int(labels[pos]), clean_pred=int(clean_pred[pos]),
                adv_pred=None if adv_pred is None else int(adv_pred[pos]), adv_radius=r if math.isfinite(r) else None,
                amplification=amp, png=png))
    return Gallery(radius, int(len(lost)), samples)


def sample_png(clean: Any, adv: Any) -> tuple[bytes, float | None]:
    """PNG bytes of three panels (clean image, adversarial image, perturbation amplified so that its largest
    pixel change spans half the grey range, mid-grey = no change) and the amplification factor."""
    import numpy as np

    clean, adv = _chw(clean), _chw(adv)
    delta = adv - clean
    peak = float(np.abs(delta).max()) if delta.size else 0.0
    amp = 0.5 / peak if peak > 0 else None
    pert = 0.5 + delta * (amp or 0.0)
    panels = [_thumb(a) for a in (clean, adv, pert)]
    return _png_row(panels), amp


def _chw(x: Any) -> Any:
    """An image as (C, H, W) float in [0, 1] (an (H, W) image gets one channel)."""
    import numpy as np

    a = np.nan_to_num(np.asarray(x, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"expected an image of shape (C, H, W), got {a.shape}")
    return a


def _thumb(chw: Any) -> Any:
    """A PIL RGB image about :data:`THUMB` pixels wide (small images enlarged by a whole factor, sharp)."""
    import numpy as np
    from PIL import Image

    c = chw.shape[0]
    a = chw if c == 3 else np.repeat(chw.mean(axis=0, keepdims=True), 3, axis=0)
    img = Image.fromarray((np.clip(a, 0.0, 1.0).transpose(1, 2, 0) * 255.0 + 0.5).astype(np.uint8), "RGB")
    h, w = img.height, img.width
    edge = max(h, w)
    if edge * 1.5 < THUMB:
        k = max(1, THUMB // edge)
        return img.resize((w * k, h * k), Image.NEAREST)
    if edge > THUMB * 1.5:
        s = THUMB / edge
        return img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
    return img


def _png_row(panels: list[Any]) -> bytes:
    from PIL import Image

    w = sum(p.width for p in panels) + _GAP * (len(panels) - 1)
    h = max(p.height for p in panels)
    canvas = Image.new("RGB", (w, h), (255, 255, 255))
    x = 0
    for p in panels:
        canvas.paste(p, (x, 0))
        x += p.width + _GAP
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()
