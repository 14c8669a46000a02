"""Video, image and frame conversion helpers (no heavy imports here)."""
