"""Depth-level dynamic neural networks trained with embedded knowledge distillation, in JAX.

``ddnn_jax.DynamicModel`` (from ``ddnn_jax.deploy.dynamic``) serves a trained run at any depth.
"""


def __getattr__(name):
  # Lazy: `import ddnn_jax` alone does not pull in jax, flax and the data stack.
  if name in ('DynamicModel', 'Prediction'):
    from ddnn_jax.deploy import dynamic  # pylint: disable=g-import-not-at-top
    return getattr(dynamic, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
