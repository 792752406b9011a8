"""From a section to a region map: tile grid, windows, encoding, voting, cache, dask."""
