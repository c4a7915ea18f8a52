"""Applications built on the ``icd`` library: command pipelines that run the library's commands.

Nothing in the library (``icd.ops``, ``icd.nn``, ``icd.detection``, ``icd.data``, ``icd.engine``)
imports from here; an application imports the library and, for the command line, is reached
from ``icd.cli``.

- :mod:`icd.apps.demo`: ``icd demo`` / ``make demo``, teacher -> student with ICD on the shapes data.
"""
