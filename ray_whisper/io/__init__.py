"""Bytes in and out: one filesystem for every path (storage), the manifest, fetching and decoding audio, the
output directory and its Parquet parts, and the files people use (subtitles, export). No model, no Ray."""
