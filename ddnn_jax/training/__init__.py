"""Training a DDNN: a run's config (``config_lib``), the losses and jitted steps, the
optimizer, checkpoints, the workdir's lock, preemption and divergence, what a run reports
(``reporting``: metrics during training, the results table and plot) and the loop that
ties them together (``trainer``). It imports ``core``, ``cpu``, ``nn`` and ``data``, never
``deploy`` or ``studies``.
"""
