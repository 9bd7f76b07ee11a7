"""Test helpers: tiny, randomly initialised diffusers pipelines for many model families (see ``families``)."""
