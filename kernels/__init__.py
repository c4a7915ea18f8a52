"""Triton kernels of icd, installed as ``icd.kernels`` (the "triton" backend's kernel table,
icd/ops/backends/triton.py, calls them).

instance_attention  split-S flash-attention forward (out, lse) and key-slice backward, for K << S
value_mask          weighted sum over instances of the attention probabilities
feature_mse         LayerNorm + weighted MSE per head: forward sums and student gradient
tuning, tiles       autotune configs, grid sizes, occupancy; tile helpers shared by the kernels
launch              how kernels are launched (torch.library.wrap_triton, or the interpreter)
"""
