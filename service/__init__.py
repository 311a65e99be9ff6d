"""oodserve's HTTP service: a model bundle's predictions with energy and FeatureNorm OOD
scores, dynamically batched. Start it with ``python -m service``; build it in code with
:func:`service.app.create_app`."""

# The project's version (pyproject.toml reads it from here).
__version__ = "0.1.0"
