"""Stage 1: detector regions and parsed triples, cached once in HDF5."""
