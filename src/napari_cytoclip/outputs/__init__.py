"""Writing results: prediction folders (TIFFs, JSON, regions) and QuPath GeoJSON."""
