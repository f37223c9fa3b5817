"""Entry points: ``python -m pipeline.<step>``, each a ``main`` a script can call plus a thin CLI."""
