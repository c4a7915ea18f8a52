"""Data: COCO-format detection datasets and the seeded shapes generator."""
