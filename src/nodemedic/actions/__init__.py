"""Repairs. Each module holds one action class and its params model; registry.py lists them."""
