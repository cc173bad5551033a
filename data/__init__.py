"""Data layer: tokenizers, dataset preparation (prepare.py per dataset), batching and similarity ordering."""
