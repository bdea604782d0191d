"""Data preparation: the dataset layout on disk, its reader, text features, the synthetic generator and the input formats (sources/)."""
