"""Vertex AI: job specs, their offline validation and submission; serving specs and requests."""
