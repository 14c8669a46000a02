"""runtime: the generation runtime (the generator, its on-demand components, the pre-flight checks)."""
