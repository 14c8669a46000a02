"""Sampling pipelines (``StepVideoPipeline``)."""
