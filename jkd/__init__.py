"""jkd: a JAX/Flax training backend for compressing vision models.

Submodules are imported lazily so that `import jkd.losses` pulls in jax only.
"""
__version__ = "0.1.0"
