"""The example script and the quickstart notebook run as shipped (tiny budgets)."""

import json
import pathlib
import runpy

import matplotlib

matplotlib.use("Agg")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_flax_example_runs(capsys):
    module = runpy.run_path(str(ROOT / "examples" / "flax_slimqn.py"))
    module["main"](epochs=2)
    out = capsys.readouterr().out
    assert "epoch 2" in out and "test accuracy" in out


def test_quickstart_notebook_code_cells_run(tmp_path, monkeypatch):
    nb = json.loads((ROOT / "notebooks" / "quickstart.ipynb").read_text())
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    code = "\n".join(c for c in cells if not c.lstrip().startswith("%pip"))
    code = code.replace("train(opt)", "train(opt, epochs=1)").replace("plt.show()", f"plt.savefig(r'{tmp_path / 'nb.png'}')")
    scope: dict = {}
    exec(compile(code, "quickstart.ipynb", "exec"), scope)
    assert set(scope["curves"]) == {"slimqn", "sgd-momentum", "adam"}
    assert (tmp_path / "nb.png").exists()
