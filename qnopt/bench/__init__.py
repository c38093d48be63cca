"""Optimizer benchmark: ``python -m qnopt.bench --help``.

Modules:

* :mod:`qnopt.bench.optimizers` – registry ``OPTIMIZERS`` of optimizer specs.
* :mod:`qnopt.bench.problems` – problems (autoencoder, classifier, convnet, logreg, logreg_digits,
  resnet and lm in train mode, ...).
* :mod:`qnopt.bench.runner` – training and timing of one run.
* :mod:`qnopt.bench.suite` – grid of runs, Adam step-time reference, metadata.
* :mod:`qnopt.bench.report` – markdown / JSON / curves.png.
* :mod:`qnopt.bench.cli` – the command line.

Nothing heavy is imported by ``import qnopt.bench``.
"""
