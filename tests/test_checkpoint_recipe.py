"""docs/checkpointing.md's recipe runs as written (orbax save; restore from the optimizer and the
parameters' shapes), restores the saved arrays exactly, and the next step from them is the
uninterrupted run's, bit for bit."""

import pathlib
import re

import jax
import numpy as np

DOC = pathlib.Path(__file__).parent.parent / "docs" / "checkpointing.md"


def test_recipe_runs_and_resumes_exactly(tmp_path):
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1).replace("/tmp/run", str(tmp_path))
    train, resume = code.split("# A new job")
    ns = {}
    exec(compile(train, str(DOC), "exec"), ns)
    saved = (ns["params"], ns["state"])
    exec(compile("# A new job" + resume, str(DOC), "exec"), ns)
    restored = (ns["params"], ns["state"])
    assert jax.tree.structure(restored) == jax.tree.structure(saved)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(a, b)
    step, batch = ns["step"], ns["batch"]
    for a, b in zip(jax.tree.leaves(step(*restored, batch, jax.random.key(5))),
                    jax.tree.leaves(step(*saved, batch, jax.random.key(5)))):
        np.testing.assert_array_equal(a, b)
