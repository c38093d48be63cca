"""Every method's alias, ``qnopt.<method>(learning_rate, ...)``, in one table.

Each alias is declared next to its transformation in ``qnopt/methods/<method>.py`` with
:func:`qnopt.contract.alias` (the contract of docs/design.md, "The contract": a *direction*
method is ``chain(scale_by_<method>(...), scale_by_learning_rate(learning_rate))``, a *step*
method is ``scale_by_<method>(learning_rate, ...)``). :data:`COMPOSITION` maps each alias's
name to its :class:`~qnopt.contract.Composition` (what ``qnopt.testing.check_contract`` checks);
an alias's ``static_args`` are the arguments ``optax.inject_hyperparams`` must keep static.
"""

from __future__ import annotations

from qnopt.contract import Composition
from qnopt.methods.kbfgs import kbfgs, kbfgs_l
from qnopt.methods.ekfac import ekfac
from qnopt.methods.kfac import kfac
from qnopt.methods.mb_lsr1 import lssr1_tr, mb_lsr1
from qnopt.methods.s2qn import s2qn, s4qn
from qnopt.methods.shampoo import shampoo
from qnopt.methods.skqn import skqn, skqn_b1, skqn_b2, skqn_l
from qnopt.methods.slimqn import slimqn
from qnopt.methods.soap import soap
from qnopt.methods.smw import smw_gn, smw_ng, smw_ng_bd
from qnopt.methods.tnt import tnt

__all__ = ["ALIASES", "COMPOSITION", "Composition", "ekfac", "kbfgs", "kbfgs_l", "kfac", "lssr1_tr", "mb_lsr1", "s2qn",
           "s4qn", "shampoo", "skqn", "skqn_b1", "skqn_b2", "skqn_l", "slimqn", "smw_gn", "soap", "smw_ng", "smw_ng_bd",
           "tnt"]

#: Every alias, in the order of the README's method table.
ALIASES = (slimqn, kbfgs, kbfgs_l, kfac, ekfac, tnt, shampoo, soap, smw_ng, smw_ng_bd, smw_gn, mb_lsr1, lssr1_tr, s2qn, s4qn,
           skqn, skqn_l, skqn_b1, skqn_b2)

#: ``{name: Composition}`` of every alias (checked for each method by ``qnopt.testing.check_contract``).
COMPOSITION: dict = {f.__name__: f.composition for f in ALIASES}
