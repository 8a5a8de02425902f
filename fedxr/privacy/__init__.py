"""Privacy beyond "only weights leave": what leaves a site (audit), differential privacy, encryption."""
