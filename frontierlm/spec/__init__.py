"""Speculative decoding: proposers (draft model, n-gram, MTP), lossless verification, adaptive draft length."""
