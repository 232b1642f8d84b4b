"""Serving: FAISS index building and loading, and the FastAPI recommendation app.

No torch here: serving needs numpy and FAISS only (fedrec/index_kinds.py says why that matters)."""
