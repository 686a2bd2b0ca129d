"""Data files, their formats, tokenization with the label mask, preparation, uploads and the preview."""
