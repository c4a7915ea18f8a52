"""The AP of each category of an evaluation, as a table (detectron2 prints one after COCOeval).

The rows come from ``icd.detection.evaluation.per_class_rows``: ``category_id``, ``name``,
``instances`` (non-crowd ground-truth boxes), ``AP``, ``AP50``, ``AP75`` (%, None for a category
without ground truth) and, for Mask R-CNN, ``segm_AP``, ``segm_AP50``, ``segm_AP75``. Written
beside the detections as ``per_class_ap_{split}.json``, ``.csv`` and ``.md``::

    | category | id | instances | AP | AP50 | AP75 |
    | --- | ---: | ---: | ---: | ---: | ---: |
    | circle | 1 | 31 | 42.7 | 80.1 | 40.3 |
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence

TABLE_FILE = "per_class_ap_{split}"
NO_GROUND_TRUTH = "-"  # a category without ground truth in the evaluated images has no AP
_HEADINGS = {"segm_AP": "mask AP", "segm_AP50": "mask AP50", "segm_AP75": "mask AP75"}


def value_columns(rows: Sequence[dict]) -> list[str]:
    """The AP columns of ``rows`` (what follows category_id, name and instances)."""
    return [k for k in rows[0] if k not in ("category_id", "name", "instances")] if rows else []


def markdown_table(rows: Sequence[dict]) -> str:
    """The rows as a markdown table, APs with one decimal, ``-`` where a category has no ground truth."""
    columns = value_columns(rows)
    lines = [
        "| " + " | ".join(["category", "id", "instances", *(_HEADINGS.get(c, c) for c in columns)]) + " |",
        "| --- | ---: | ---: |" + " ---: |" * len(columns),
    ]
    for row in rows:
        values = [NO_GROUND_TRUTH if row[c] is None else f"{row[c]:.1f}" for c in columns]
        name = str(row["name"]).replace("|", "\\|")
        lines.append(f"| {name} | {row['category_id']} | {row['instances']} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def csv_table(rows: Sequence[dict]) -> str:
    """The rows as CSV (a header line; an empty cell where a category has no ground truth)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else ["category_id", "name", "instances"])
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    return out.getvalue()


def write_class_tables(output_dir: str, split: str, rows: Sequence[dict]) -> dict[str, str]:
    """``per_class_ap_{split}.json``, ``.csv`` and ``.md`` in ``output_dir``, each written atomically;
    returns the paths by extension."""
    base = os.path.join(output_dir, TABLE_FILE.format(split=split))
    texts = {"json": json.dumps(list(rows), indent=1) + "\n", "csv": csv_table(rows), "md": markdown_table(rows)}
    os.makedirs(output_dir, exist_ok=True)
    paths = {}
    for ext, text in texts.items():
        path = f"{base}.{ext}"
        with open(f"{path}.tmp", "w", newline="") as f:
            f.write(text)
        os.replace(f"{path}.tmp", path)
        paths[ext] = path
    return paths
