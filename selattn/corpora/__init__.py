"""The embedded default corpus (Shakespeare's plays), rebuilt by `build_corpus.py`."""
