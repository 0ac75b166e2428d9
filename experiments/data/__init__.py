"""Datasets: the embedded digits, image folders, moving digits and video folders, and the registry that maps a
data option (``data.name``) to its builder and startup check."""
