"""Triton kernels of icd, installed as ``icd.kernels`` (see icd/ops/backends/triton.py)."""
