"""Reading sections: files and napari layers in, tissue masks, the npe2 reader and sample data."""
