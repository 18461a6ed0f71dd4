"""What every layer of ddnn_jax may use: the error kinds, the device mesh and sharding
helpers, and the generic file and figure helpers. It imports nothing else of ddnn_jax.
"""
