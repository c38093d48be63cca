"""``python -m qnopt.bench`` entry point."""

from qnopt.bench.cli import main

raise SystemExit(main())
