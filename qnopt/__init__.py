"""qnopt: stochastic quasi-Newton and Kronecker-factored optimizers as optax transformations."""

__version__ = "0.1.0"
