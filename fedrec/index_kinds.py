"""The serving index kinds, in a module that imports nothing.

Why a module of its own: the run config validates `output.index` against this list, and the
serving workers read it too; from `fedrec.config` it pulled torch into every worker (about 350 MB
of resident memory each, for nothing: serving needs numpy and FAISS only).
"""

INDEX_KINDS = ("flat", "ivf", "ivfpq", "hnsw")  # serving/index.py builds each; config also takes "auto"
