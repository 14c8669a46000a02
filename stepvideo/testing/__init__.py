"""Test support shipped with the package: the tiny-model factory and deterministic random init."""
