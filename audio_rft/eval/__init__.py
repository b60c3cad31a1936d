"""Eval stage: batched inference (infer.py), the MMAU scoring rule (score.py), comparison reports (report.py)."""
