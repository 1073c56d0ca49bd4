"""Audit settings: one typed dataclass, filled from defaults < a TOML spec file < explicit overrides.

Unknown keys (in a spec file or as overrides) are an error. Keys may be written
with ``_`` or ``-`` (``batch_size`` or ``batch-size``). This module imports only
the standard library, so the CLI can build a config before importing torch.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from pathlib import Path
from typing import Any, Mapping

from robkd.errors import UsageError
from robkd.utils.validate import check_int, check_text, parse_floats, parse_shape, split_list

CERTIFY_METHODS = ("ibp", "crown", "alpha-crown")


@dataclasses.dataclass
class AuditConfig:
    """Everything that defines an audit (what ``results.json`` stores under ``config``)."""

    teacher: str | None = None
    student: str | None = None
    data: str = "fashion-mnist"
    data_dir: str | None = None
    split: str = "test"
    n: int = 1000
    seed: int = 0
    eps: list[float] | None = None  # None: the dataset's usual headline radius
    norm: str = "Linf"
    attacks: list[str] = dataclasses.field(default_factory=lambda: ["pgd-20"])
    batch_size: int = 256
    device: str = "cpu"
    gates: list[str] = dataclasses.field(default_factory=list)
    gate_on: str = "lower"
    enforce_default_verdict: bool = False  # the default transfer verdict (kept >= 90% at the largest radius) fails the audit
    certify: str | None = None
    linear_region_radius: bool = False  # with certify: per-sample largest radius inside one linear region
    llm: bool = False
    llm_steps: int = 20
    llm_restarts: int = 1  # random restarts of the local-linearity (and Prop-2 LHS) ascents
    strict: bool = False
    self_test: bool = False  # the attack self-test (binarization test) of each gradient attack at the largest radius
    self_test_n: int = 20  # samples of the attack self-test
    corruptions: list[str] | None = None  # common corruptions to evaluate (["all"]: all 15); None: off
    severities: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 3, 4, 5])  # corruption severities
    sanity_n: int = 40  # samples of the attack-based sanity checks (0: only the cheap checks; see --sanity-n)
    out: str | None = None
    # result cache (robkd.auditing.cache): None the default directory (off under ROBKD_NO_CACHE=1), False off, or a directory
    cache: bool | str | None = None
    # model loading (for files that do not describe themselves)
    arch: str | None = None
    teacher_arch: str | None = None
    student_arch: str | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    num_classes: int | None = None
    input_shape: list[int] | None = None
    allow_pickle: bool = False
    img_size: int | None = None
    download: bool = False

    # ------------------------------------------------------------------ building
    @classmethod
    def field_names(cls) -> list[str]:
        """All accepted keys."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_spec(cls, path: str | Path | None = None, *, preset: str | None = None, **overrides: Any) -> "AuditConfig":
        """Defaults, then the named ``preset`` (:mod:`robkd.auditing.presets`, for the dataset and norm the spec
        or overrides choose), then the TOML spec file (if any), then ``overrides`` whose value is not None."""
        values: dict[str, Any] = {}
        if path is not None:
            values.update(read_spec(path))
        values.update(_normalise_keys({k: v for k, v in overrides.items() if v is not None}, "override"))
        if preset is not None:
            from robkd.auditing.presets import preset_values

            data, norm = values.get("data") or cls.data, values.get("norm") or cls.norm
            values = {**preset_values(preset, data=str(data), norm=str(norm)), **values}
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> "AuditConfig":
        """Normalise and check every field in place (raises :class:`UsageError`); returns self."""
        from robkd.types import Norm, parse_eps_list

        self.data = check_text(self.data, "data")
        self.split = check_text(self.split, "split")
        if self.split not in ("train", "test", "val"):
            raise UsageError(f"unknown split {self.split!r}: use train or test")
        self.n = check_int(self.n, "n", 1, parse_text=True)
        self.seed = check_int(self.seed, "seed", 0, parse_text=True)
        self.batch_size = check_int(self.batch_size, "batch_size", 1, parse_text=True)
        self.llm_steps = check_int(self.llm_steps, "llm_steps", 1, parse_text=True)
        self.llm_restarts = check_int(self.llm_restarts, "llm_restarts", 1, parse_text=True)
        self.sanity_n = check_int(self.sanity_n, "sanity_n", 0, parse_text=True)
        self.self_test_n = check_int(self.self_test_n, "self_test_n", 1, parse_text=True)
        self._validate_corruptions()
        if self.eps is not None:
            if isinstance(self.eps, (int, float)) and not isinstance(self.eps, bool):
                self.eps = [self.eps]
            if isinstance(self.eps, (list, tuple)) and not self.eps:
                raise UsageError("empty eps list")
            self.eps = parse_eps_list(self.eps if isinstance(self.eps, (list, tuple)) else str(self.eps))
            if any(not math.isfinite(e) or e <= 0 for e in self.eps):
                raise UsageError(f"every radius must be > 0, got {self.eps}")
        self.norm = Norm.parse(self.norm).value
        if self.norm == Norm.LINF.value and self.eps is not None and max(self.eps) > 1:
            raise UsageError(f"Linf radius {max(self.eps):g} is larger than the whole [0,1] pixel range: radii are in "
                             "[0,1] pixel space (e.g. 8/255, not 8)")
        if self.eps is None and self.norm != Norm.LINF.value:
            raise UsageError(f"--norm {self.norm} needs radii: give them with --eps (the datasets' usual radii are Linf radii)")
        self.attacks = [a.lower() for a in split_list(self.attacks, "attacks")]  # attack names are case-insensitive
        if not self.attacks:
            raise UsageError("no attacks given (e.g. --attacks pgd-20,autoattack)")
        if len(set(self.attacks)) != len(self.attacks):
            raise UsageError(f"attack listed twice in {self.attacks}")
        self.gates = split_list(self.gates, "gates", split_commas=False)
        if self.gate_on not in ("lower", "point"):
            raise UsageError(f"unknown gate_on {self.gate_on!r}: use 'lower' (confidence bounds, default) or 'point'")
        if self.certify is not None:
            self.certify = str(self.certify).lower()
            if self.certify not in CERTIFY_METHODS:
                raise UsageError(f"unknown certify method {self.certify!r}: use one of {', '.join(CERTIFY_METHODS)}")
        for name in ("llm", "strict", "self_test", "allow_pickle", "download", "linear_region_radius", "enforce_default_verdict"):
            if not isinstance(getattr(self, name), bool):
                raise UsageError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.linear_region_radius and self.certify is None:
            raise UsageError("linear_region_radius (--linear-region-radius) needs certify (--certify METHOD)")
        for name in ("mean", "std"):
            val = getattr(self, name)
            if val is not None:
                setattr(self, name, parse_floats(val, f"{name} (--{name})"))
        if self.input_shape is not None:
            self.input_shape = list(parse_shape(self.input_shape))
        if self.num_classes is not None:
            self.num_classes = check_int(self.num_classes, "num_classes", 1, parse_text=True)
        if self.img_size is not None:
            self.img_size = check_int(self.img_size, "img_size", 1, parse_text=True)
        self.device = check_text(self.device, "device")
        if self.cache is not None and not isinstance(self.cache, bool):
            if not isinstance(self.cache, (str, Path)):
                raise UsageError(f"cache must be a directory, true or false, got {self.cache!r}")
            self.cache = check_text(str(self.cache), "cache")
        for name in ("teacher", "student", "data_dir", "out", "arch", "teacher_arch", "student_arch"):
            val = getattr(self, name)
            if val is not None:
                setattr(self, name, check_text(val, name))
        return self

    def _validate_corruptions(self) -> None:
        """``corruptions``: None (off), ``true``/``"all"`` (all 15) or names (checked against the registry by the
        plan); ``severities``: integers in 1..5, ascending, no repeats."""
        if self.corruptions is True:
            self.corruptions = ["all"]
        elif self.corruptions is False:
            self.corruptions = None
        if self.corruptions is not None:
            names = [c.lower().replace("-", "_") for c in split_list(self.corruptions, "corruptions")]
            if not names:
                raise UsageError("corruptions: name at least one corruption, or all (e.g. --corruptions gaussian_noise,fog)")
            if len(set(names)) != len(names):
                raise UsageError(f"corruption listed twice in {names}")
            if "all" in names and len(names) > 1:
                raise UsageError("corruptions: 'all' cannot be combined with names")
            self.corruptions = names
        sev = self.severities
        if isinstance(sev, (int, str)) and not isinstance(sev, bool):
            sev = [s for s in str(sev).split(",") if s.strip()]
        if not isinstance(sev, (list, tuple)) or not sev:
            raise UsageError(f"severities must be a non-empty list of integers 1..5, got {self.severities!r}")
        values = [check_int(v, "severity", 1, parse_text=True) for v in sev]
        if any(v > 5 for v in values) or len(set(values)) != len(values):
            raise UsageError(f"severities must be distinct integers 1..5, got {values}")
        self.severities = sorted(values)

    def model_kwargs(self, role: str, path: str | Path | None = None) -> dict[str, Any]:
        """Keyword arguments for :func:`robkd.models.load_model` for ``role`` (teacher/student).

        ``--mean/--std/--num-classes/--input-shape`` are shared by both models: they fill in what a
        model file does not carry. With ``path``, the values a robkd checkpoint carries itself are left
        to the checkpoint (load_model refuses a flag that contradicts its file)."""
        kw: dict[str, Any] = dict(
            arch=getattr(self, f"{role}_arch") or self.arch,
            mean=tuple(self.mean) if self.mean is not None else None,
            std=tuple(self.std) if self.std is not None else None,
            num_classes=self.num_classes,
            input_shape=tuple(self.input_shape) if self.input_shape is not None else None,
            allow_pickle=self.allow_pickle,
        )
        if path is not None:
            from robkd.models.formats.checkpoint import checkpoint_meta

            own = checkpoint_meta(path)
            for name in ("mean", "std", "num_classes", "input_shape"):
                if own is not None and getattr(own, name) is not None:
                    kw[name] = None
        return kw

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict of every field."""
        return dataclasses.asdict(self)


#: prefix naming a spec bundled with robkd (``robkd:demo``); a bare name without a path works too (``demo``)
BUNDLED_PREFIX = "robkd:"


def bundled_specs() -> dict[str, Any]:
    """The audit specs shipped inside the package (``robkd/audits/*.toml``, copies of the repository's
    ``audits/``): name (file stem) -> resource path."""
    from importlib.resources import files

    folder = files("robkd") / "audits"
    if not folder.is_dir():
        return {}
    return {Path(e.name).stem: e for e in sorted(folder.iterdir(), key=lambda e: e.name) if e.name.endswith(".toml")}


def resolve_spec(path: str | Path) -> Any:
    """The spec file ``path`` names: an existing file, else a bundled spec named ``robkd:NAME``, ``NAME`` or
    ``NAME.toml`` (no folder part); raises :class:`UsageError` listing the bundled names otherwise."""
    text = str(path)
    p = Path(text)
    if p.is_file():
        return p
    name = text[len(BUNDLED_PREFIX):] if text.startswith(BUNDLED_PREFIX) else text
    bundled = bundled_specs()
    if "/" not in name and "\\" not in name:
        stem = name[:-5] if name.endswith(".toml") else name
        if stem in bundled:
            return bundled[stem]
    names = ", ".join(bundled) or "none"
    raise UsageError(f"audit spec not found: {p} (bundled specs, usable as --spec NAME: {names})")


def read_spec(path: str | Path) -> dict[str, Any]:
    """Read an audit spec (TOML, flat keys; a file or a bundled name, :func:`resolve_spec`) and check its
    keys; raises :class:`UsageError`."""
    p = resolve_spec(path)
    try:
        with p.open("rb") as fh:
            raw = tomllib.load(fh)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"audit spec {p} is not valid TOML: {exc}") from exc
    return _normalise_keys(raw, f"audit spec {p}")


def _normalise_keys(values: Mapping[str, Any], where: str) -> dict[str, Any]:
    known = set(AuditConfig.field_names())
    out: dict[str, Any] = {}
    unknown = []
    for key, val in values.items():
        k = str(key).replace("-", "_")
        if k not in known:
            unknown.append(str(key))
        out[k] = val
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")
    return out
