"""Serving: FAISS index building/loading and (later) the FastAPI recommendation app."""
