"""icd: Instance-Conditional Knowledge Distillation for object detection (Kang et al., NeurIPS 2021).

- ``icd.ops``: the fused ops (instance attention, value mask, masked feature MSE) with
  reference, C++ CPU, CUDA and Triton backends.
- ``icd.nn``: the instance encoder, conditional decoder, auxiliary task and ICDDistiller.
"""

__version__ = "0.1.0"
