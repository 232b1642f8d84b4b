"""Data sources (synthetic shop log, MovieLens-100K, a merchant's own file) and the split protocol."""
