"""Depth-level dynamic neural networks with embedded knowledge distillation."""
