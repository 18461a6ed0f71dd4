"""The data: the datasets' specs (``datasets``), their offline preparation into
ArrayRecord files (``preparation``) and the grain input pipeline that reads them for
training and evaluation (``pipeline``). It imports only ``ddnn_jax.core``; it knows nothing
of the networks or of training.
"""
