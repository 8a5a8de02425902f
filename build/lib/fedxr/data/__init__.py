"""Data layer: NIH ChestX-ray14 reader, phantom generator, site partitioning, cache, datamodule."""
