"""The example script and the quickstart notebook run as shipped (tiny budgets)."""

import json
import math
import pathlib
import random
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


def test_readme_quickstart_runs():
    readme = (ROOT / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert float(scope["loss"]) < 2.3  # it trained (log 10 ≈ 2.30 at chance)


def test_readme_kronecker_example_runs():
    readme = (ROOT / "README.md").read_text()
    code = readme.split("```python\n", 2)[2].split("```", 1)[0]
    assert "qnopt.kbfgs" in code
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert float(scope["loss"]) < 1.0  # it trained (log 10 ≈ 2.30 at chance)


def test_kbfgs_cnn_example_runs(capsys):
    module = runpy.run_path(str(ROOT / "examples" / "flax_kbfgs_cnn.py"))
    for name in ("kbfgs", "kfac"):
        module["main"](name, epochs=2)
    out = capsys.readouterr().out
    assert "kbfgs epoch 2" in out and "kfac epoch 2" in out and "fallback" in out
    accs = [float(line.rsplit(" ", 1)[1]) for line in out.splitlines() if "epoch 2" in line]
    assert min(accs) > 0.8, accs


def test_mb_lsr1_example_pipeline_follows_the_controller(capsys):
    """The example's own 150 steps. After 40 (the former length) the batch is still 32–128 and
    the radius has grown to 10–20: the full-data loss swings between 0.1 and 0.65 from step to
    step (both jaxlib 0.10.1 and 0.10.2), and the test sampled that swing (balanced accuracy 0.54
    with 0.10.1, 0.92 with 0.10.2). By 150 steps the controller has grown the batch to 64–1437
    and seeds 0–3 reach 0.93–0.98 (0.10.1) and 0.90–0.98 (0.10.2)."""
    module = runpy.run_path(str(ROOT / "examples" / "mb_lsr1_batch_growth.py"))
    out = module["main"]()
    sizes, state = out["sizes"], out["state"]
    assert sizes[0] == 32 and all(b >= a for a, b in zip(sizes, sizes[1:]))
    n = len(module["imbalanced_digits"]()[0])   # the batch doubles, capped at the data size (Alg. 6)
    assert int(state.batch.batch_size) == min(32 * 2 ** int(state.batch.increases), n)
    assert out["balanced_accuracy"] > 0.7   # it learned (0.5 = predicting one class)
    assert "final batch size" in capsys.readouterr().out


def test_resnet_example_runs(capsys):
    """Adam's plain train-mode step and K-BFGS(L) through the capture, on digits: the BatchNorm
    running averages move and the eval-mode losses are finite."""
    module = runpy.run_path(str(ROOT / "examples" / "resnet_fashion_mnist.py"))
    results = module["main"](steps=3, optimizers=("adam", "kbfgs_l"), batch_size=16, data="digits", log_every=3)
    out = capsys.readouterr().out
    assert "adam step 3" in out and "kbfgs_l step 3" in out and "test acc" in out
    for r in results.values():
        assert math.isfinite(r["test_loss"]) and 0 <= r["test_accuracy"] <= 1
        mean = r["batch_stats"]["BatchNorm_0"]["mean"]
        assert float(abs(mean).max()) > 0       # the running mean left its initial zeros


def test_char_lm_example_runs(tmp_path, capsys):
    """TNT through the per-token capture and Adam on a small fortune file (``--data``)."""
    words = "a fool and his money are soon parted but wisdom waits for no one at all".split()
    rng = random.Random(0)
    (tmp_path / "quotes").write_text("%\n".join(" ".join(rng.choices(words, k=25)) + "\n" for _ in range(30)))
    module = runpy.run_path(str(ROOT / "examples" / "char_lm_fortunes.py"))
    results = module["main"](steps=3, optimizers=("adam", "tnt"), batch_size=8, data=str(tmp_path), log_every=3)
    out = capsys.readouterr().out
    assert "tnt step 3" in out and "bits/char" in out
    assert all(math.isfinite(r["test_loss"]) for r in results.values())
