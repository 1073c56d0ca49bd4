"""Named audit presets (``robkd audit --preset NAME``): a typed table of settings per preset and dataset.

Precedence: explicit flags > ``--spec`` file > preset > :class:`~robkd.auditing.config.AuditConfig`
defaults. A preset fills ``attacks``, ``n``, ``sanity_n`` and, where it names them, the radii of the
dataset and norm being audited; a radius it leaves open is the dataset's usual radius (the registry's
``default_eps``: CIFAR-10/100 8/255, ImageNet-style ImageFolder 4/255, Fashion-MNIST 0.1, MNIST 0.3), as
without a preset. Standard library only (the CLI builds a config before importing torch).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from robkd.errors import UsageError


@dataclasses.dataclass(frozen=True)
class DatasetSetting:
    """What a preset sets for one dataset: the sample count and, per norm, the radii (absent: the dataset's
    usual Linf radius; no usual L2 radius exists, so an L2 audit without radii still needs ``--eps``)."""

    n: int
    eps: Mapping[str, tuple[float, ...]] = dataclasses.field(default_factory=dict)  # norm ("Linf"/"L2") -> radii


@dataclasses.dataclass(frozen=True)
class Preset:
    """One named preset."""

    name: str
    summary: str  # one line for --help
    attacks: tuple[str, ...]
    default: DatasetSetting  # datasets not listed in per_dataset
    per_dataset: Mapping[str, DatasetSetting] = dataclasses.field(default_factory=dict)
    sanity_n: int | None = None  # None: the AuditConfig default

    def setting(self, data: str) -> DatasetSetting:
        """The setting for dataset ``data`` (its registry name)."""
        key = str(data).strip().lower().replace("-", "").replace("_", "")
        return self.per_dataset.get(key, self.default)

    def values(self, data: str, norm: str) -> dict[str, Any]:
        """The :class:`AuditConfig` values this preset gives an audit of ``data`` under ``norm``."""
        s = self.setting(data)
        out: dict[str, Any] = {"attacks": list(self.attacks), "n": s.n}
        key = "L2" if str(norm).strip().lower() == "l2" else "Linf"
        if key in s.eps:
            out["eps"] = list(s.eps[key])
        if self.sanity_n is not None:
            out["sanity_n"] = self.sanity_n
        return out


_CIFAR_RB = DatasetSetting(n=10000, eps={"L2": (0.5,)})

#: the presets, by name. robustbench: RobustBench's evaluation (Croce et al. 2021): AutoAttack's standard
#: version at the leaderboards' radii (CIFAR-10/100 Linf 8/255 and L2 0.5, ImageNet Linf 4/255) on the
#: first 10,000 (CIFAR: the whole test set) or 5,000 (ImageNet) samples; Fashion-MNIST/MNIST (not on
#: RobustBench) use their usual radius and the whole 10,000-image test set.
PRESETS: dict[str, Preset] = {
    "robustbench": Preset(
        name="robustbench",
        summary=("AutoAttack (standard) at the usual radii (CIFAR Linf 8/255 or L2 0.5, ImageNet Linf 4/255, "
                 "Fashion-MNIST 0.1, MNIST 0.3) on 10000 samples (ImageNet 5000)"),
        attacks=("autoattack",),
        default=DatasetSetting(n=10000),
        per_dataset={"cifar10": _CIFAR_RB, "cifar100": _CIFAR_RB, "imagefolder": DatasetSetting(n=5000)},
    ),
    "quick": Preset(
        name="quick",
        summary="a cheap smoke test: fgsm,pgd-10 at the dataset's usual radius on 100 samples, 16 sanity samples",
        attacks=("fgsm", "pgd-10"),
        default=DatasetSetting(n=100),
        sanity_n=16,
    ),
}


def get_preset(name: str) -> Preset:
    """The preset called ``name`` (case-insensitive); :class:`UsageError` (exit 2) listing the presets otherwise."""
    key = str(name).strip().lower()
    if key not in PRESETS:
        raise UsageError(f"unknown preset {name!r}: use one of {', '.join(PRESETS)}")
    return PRESETS[key]


def preset_values(name: str, *, data: str, norm: str) -> dict[str, Any]:
    """The settings preset ``name`` gives an audit of ``data`` under ``norm`` (see :meth:`Preset.values`)."""
    return get_preset(name).values(data, norm)


def presets_help() -> str:
    """One line per preset, for ``--help``."""
    return "; ".join(f"{p.name}: {p.summary}" for p in PRESETS.values())
