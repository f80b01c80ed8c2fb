"""The declarative policy: models (model.py), loading (load.py), matching (match.py)."""
