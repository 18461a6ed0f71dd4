"""CPU speed: the XLA CPU settings the commands apply, how many CPU devices training splits a
batch over, oneDNN's convolutions as XLA custom calls (built from ``csrc/``) and the fused
train-mode BatchNorm. It imports only ``ddnn_jax.core``.
"""
