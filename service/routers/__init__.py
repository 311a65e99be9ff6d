"""HTTP routes: predictions, health and model description, metrics."""
