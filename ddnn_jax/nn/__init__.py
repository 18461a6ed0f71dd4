"""The networks: depth notation, the architectures, their layers and blocks, the DDNN
model that runs any depth over one parameter tree, its FLOPs and the channel ranking of
narrower widths. It imports ``ddnn_jax.core`` and ``ddnn_jax.cpu`` only (a run's config
becomes a model in ``ddnn_jax.training.config_lib``).
"""
