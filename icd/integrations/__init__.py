"""Integrations of ICD with third-party training frameworks, each imported on its own.

``icd.integrations.ultralytics``: ICD for ultralytics YOLO detectors (needs the
``ultralytics`` extra, AGPL-3.0). Nothing here is imported by ``icd`` itself.
"""
