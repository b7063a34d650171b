"""Method families: the base each method file builds on, one file per family.

Each family base declares `family` once; models/registry.py reads it for every method.
"""
