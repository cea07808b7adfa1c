"""Grammar-constrained generation backed by xgrammar."""
