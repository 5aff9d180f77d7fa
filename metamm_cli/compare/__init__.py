"""`metamm compare`: runs read back (runs/reader.py) -> one table (table.py) -> text
(render.py) or a figure (plots.py); evaluation of many runs on the same episodes
(evaluate.py); robustness curves and the per-modality ensemble (robustness.py)."""
