"""Adapter to the reference AutoAttack implementation (``pyautoattack``).

Specs and the configuration each one uses (exactly the reference's):

- ``autoattack``: the standard version (APGD-CE, APGD-T with 9 target classes,
  FAB-T with 9 target classes, Square with 5000 queries), run as one cascade.
- ``autoattack-plus``: the ``plus`` version (APGD-CE/DLR and FAB with 5
  restarts, Square, APGD-T, FAB-T).
- ``autoattack-rand``: the ``rand`` version for stochastic models (APGD-CE and
  APGD-DLR with 20 EOT iterations).
- ``apgd-ce``, ``apgd-t``, ``fab-t``, ``square``: one component, configured as
  in the standard version; ``apgd-dlr``, ``fab``: as in the plus version.

The reference runner is called on the given samples with the given batch size
and seed, so the numbers equal running ``pyautoattack`` directly on them. The
number of target classes is capped at ``K - 1`` for models with fewer than 10
classes. pyautoattack re-seeds torch's global RNG; robkd isolates that with
``torch.random.fork_rng``. ``n_queries`` overrides Square's query budget
(5000; a non-standard, weaker setting meant for quick checks).

pyautoattack's own resumable state files are not used: pyautoattack 0.2 writes
its set of attacks as a string and then refuses to restore any file it wrote,
and a state file describes one call's samples only (robkd calls it per model,
radius and remaining samples). Audits resume at robkd's granularity instead
(every finished attack and radius).
"""

from __future__ import annotations


import torch

from robkd.attacks.base import Attack, AttackOutput
from robkd.errors import UsageError
from robkd.types import Norm

#: spec -> (pyautoattack version whose settings are used, components to run or None for the whole version, cost)
AUTOATTACK_SPECS: dict[str, tuple[str, list[str] | None, float]] = {
    "apgd-ce": ("standard", ["apgd-ce"], 100.0),
    "apgd-dlr": ("plus", ["apgd-dlr"], 500.0),
    "fab": ("plus", ["fab"], 1000.0),
    "apgd-t": ("standard", ["apgd-t"], 900.0),
    "fab-t": ("standard", ["fab-t"], 1800.0),
    "square": ("standard", ["square"], 2500.0),
    "autoattack-rand": ("rand", None, 4000.0),
    "autoattack": ("standard", None, 6000.0),
    "autoattack-plus": ("plus", None, 12000.0),
}


class AutoAttackAdapter(Attack):
    """One pyautoattack configuration (see the module docstring for the specs)."""

    supports_targeted = False
    base_batching = False

    def __init__(
        self,
        spec: str,
        norm: "Norm | str",
        eps: float,
        *,
        seed: int = 0,
        batch_size: int = 256,
        n_queries: int | None = None,
    ) -> None:
        super().__init__(norm, eps, seed=seed, batch_size=batch_size)
        if n_queries is not None and (isinstance(n_queries, bool) or not isinstance(n_queries, int) or n_queries < 1):
            raise UsageError(f"n_queries must be an integer >= 1, got {n_queries!r}")
        self.n_queries = n_queries
        if spec not in AUTOATTACK_SPECS:
            raise UsageError(f"unknown AutoAttack spec {spec!r}: use one of {sorted(AUTOATTACK_SPECS)}")
        self.name = spec
        self.version, self.components, self.cost = AUTOATTACK_SPECS[spec]

    def build(self, model: torch.nn.Module, num_classes: int, device: torch.device):
        """The configured ``pyautoattack.AutoAttack`` runner for ``model``."""
        from pyautoattack import AutoAttack

        aa = AutoAttack(model, norm=self.norm.value, eps=self.eps, seed=self.seed, version=self.version, device=device)
        if self.components is not None:
            aa.attacks_to_run = list(self.components)
        n_targets = min(9, max(1, num_classes - 1))
        aa.apgd_targeted.n_target_classes = min(aa.apgd_targeted.n_target_classes, n_targets)
        aa.fab.n_target_classes = min(aa.fab.n_target_classes, n_targets)
        if self.n_queries is not None:
            aa.square.n_queries = self.n_queries
        return aa

    def _perturb(self, model, x, y, target, generator) -> AttackOutput:
        with torch.no_grad():
            num_classes = int(model(x[:1]).shape[1])
        aa = self.build(model, num_classes, x.device)
        devices = [x.device.index or 0] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            x_adv, y_adv = aa.run_standard_evaluation(x, y, batch_size=self.batch_size)
        return AttackOutput(x_adv.detach(), (y_adv != y))
