"""Data in: the ingest stage reads a COCO source, decodes and checks its images, and writes the catalog."""
