"""Model registry, the multi-label classifier, metrics and the fedxr checkpoint format."""
