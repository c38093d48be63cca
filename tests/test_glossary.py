"""docs/glossary.md lists every hyper-parameter of every method once, and the renamed arguments
keep working for one release: same update, with a DeprecationWarning."""

import inspect
import pathlib
import re
import warnings

import jax
import jax.numpy as jnp
import pytest

import qnopt
from qnopt.alias import ALIASES

GLOSSARY = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "glossary.md").read_text()
CURRENT = GLOSSARY.split("## Renamed", 1)[0]   # the renamed table lists old names too
_TRANSFORMS = [c.scale_by for c in qnopt.alias.COMPOSITION.values()]


def _listed(name):
    """``name`` is the first column of a glossary row (alone or among comma-separated names)."""
    return re.search(rf"^\| (`[a-z0-9_]+`, )*`{name}`(, `[a-z0-9_]+`)* \|", CURRENT, re.M) is not None


def test_every_argument_is_in_the_glossary():
    missing = sorted({f"{f.__name__}({p})" for f in list(ALIASES) + _TRANSFORMS
                      for p in inspect.signature(f).parameters if not _listed(p)})
    assert not missing, f"add to docs/glossary.md: {missing}"


def test_the_check_can_fail():
    assert _listed("damping") and _listed("beta2") and not _listed("estimator") and not _listed("p")


def _renamed_rows():
    table = GLOSSARY.split("## Renamed", 1)[1]
    return re.findall(r"^\| `(\w+)` \| `(\w+)` \|", table, re.M)


def test_every_renamed_argument_is_in_the_table():
    rows = set(_renamed_rows())
    declared = {(old, new) for f in _TRANSFORMS + [qnopt.curvature.estimate_mode_statistics]
                for old, new in getattr(f, "renamed", {}).items()}
    assert declared and declared <= rows, f"renamed but not in the glossary's table: {declared - rows}"


_PARAMS = {"Dense_0": {"kernel": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "bias": jnp.zeros(4)}}
_GRADS = jax.tree.map(lambda p: jnp.cos(p) + 0.1, _PARAMS)


def _first_update(opt):
    return opt.update(_GRADS, opt.init(_PARAMS), _PARAMS)[0]


@pytest.mark.parametrize("factory,old,new,value", [
    (qnopt.slimqn, "damping", "pair_damping", 0.2),
    (qnopt.shampoo, "initial_statistics", "initial_factors", None),
    (qnopt.tnt, "estimator", "fisher", "empirical"),
])
def test_old_name_warns_and_gives_the_same_update(factory, old, new, value):
    with pytest.warns(DeprecationWarning, match=rf"qnopt\.{factory.__name__}\({old}=\.\.\.\) is deprecated: "
                                                rf"the argument is now {new}="):
        before = _first_update(factory(0.1, **{old: value}))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)   # the new name warns of nothing
        after = _first_update(factory(0.1, **{new: value}))
    qnopt.testing.assert_trees_equal(before, after, f"{old} -> {new}")


@pytest.mark.parametrize("factory,old,new,value", [
    (qnopt.scale_by_smw_ng, "damping", "initial_damping", 0.5), (qnopt.smw_gn, "eps", "lm_threshold", 0.2),
    (qnopt.smw_ng_bd, "eta", "min_ratio", 0.1), (qnopt.kbfgs, "mu1", "powell_mu", 0.3),
    (qnopt.skqn_b1, "p", "block_form", "trace"), (qnopt.scale_by_kbfgs, "mu1", "powell_mu", 0.3),
])
def test_old_name_reaches_the_new_argument(factory, old, new, value):
    """The methods that need an oracle: the old name sets the new argument (visible as the
    range check of the new name, or in the built transformation's behaviour above)."""
    args = (0.1,) if "learning_rate" in inspect.signature(factory).parameters else ()
    with pytest.warns(DeprecationWarning, match=f"now {new}="):
        factory(*args, **{old: value})
    with pytest.raises(TypeError, match=f"pass only {new}="):
        factory(*args, **{old: value, new: value})


def test_renamed_names_of_the_package():
    with pytest.warns(DeprecationWarning, match="ScaleBySlimqnState"):
        assert qnopt.ScaleBySlimQNState is qnopt.ScaleBySlimqnState
    with pytest.warns(DeprecationWarning, match="kron_matvec"):
        assert qnopt.curvature.kron_inverse_apply is qnopt.curvature.kron_matvec
    with pytest.raises(AttributeError):
        qnopt.NoSuchThing
