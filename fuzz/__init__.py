"""Fuzz targets: the SMTP edge and the MIME side (`make test` runs short campaigns)."""
