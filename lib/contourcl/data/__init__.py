"""Data: structure names and numbering, reading and writing volumes, cases, preprocessing, phantoms."""
