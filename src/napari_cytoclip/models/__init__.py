"""Model bundles, open_clip models built from them, architectures and region vocabularies."""
