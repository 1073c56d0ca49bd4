"""Adversarial attacks in [0,1] pixel space (Linf and L2), the attack suite and the re-check.

``make_attack(spec, norm, eps, **kw)`` builds an attack (``fgsm``, ``pgd-20``,
``pgd-20x100``, ``mifgsm-20``, ``deepfool``, ``apgd-ce``, ``apgd-t``, ``fab-t``,
``square``, ``autoattack``, ``autoattack-plus``, ``autoattack-rand``);
``Suite`` runs a worst-case cascade over radii; ``verify_adversarial`` re-checks
examples with a plain forward pass; ``projected_gradient_ascent`` is the PGD
primitive used by training objectives.
"""

from robkd.attacks.autoattack import AutoAttackAdapter
from robkd.attacks.base import Attack, AttackOutput, attack_mode, verify_adversarial
from robkd.attacks.deepfool import DeepFool
from robkd.attacks.fgsm import FGSM
from robkd.attacks.mifgsm import MIFGSM
from robkd.attacks.pgd import PGD, projected_gradient_ascent
from robkd.attacks.registry import ATTACK_SPECS, attack_cost, make_attack
from robkd.attacks.suite import CLEAN_WRONG, ROBUST, Suite, SuiteResult

__all__ = [
    "ATTACK_SPECS",
    "Attack",
    "AttackOutput",
    "AutoAttackAdapter",
    "CLEAN_WRONG",
    "DeepFool",
    "FGSM",
    "MIFGSM",
    "PGD",
    "ROBUST",
    "Suite",
    "SuiteResult",
    "attack_cost",
    "attack_mode",
    "make_attack",
    "projected_gradient_ascent",
    "verify_adversarial",
]
