"""Datasets, archives and transforms for training and evaluation."""
