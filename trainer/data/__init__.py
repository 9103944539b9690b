"""Data: the record schema, dataset preparation, input pipelines and the demo data."""
