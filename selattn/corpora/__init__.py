"""Corpora: the embedded default (Shakespeare's plays, rebuilt by `build_corpus.py`); others to fetch (`fetch.py`)."""
