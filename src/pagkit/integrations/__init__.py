"""Integrations with other libraries: diffusers pipelines and models."""
