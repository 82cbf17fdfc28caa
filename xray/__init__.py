"""Xray/V2Ray sidecars: config generation, share-link import, process management."""
