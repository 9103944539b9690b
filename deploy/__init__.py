"""Vertex AI job specs, their offline validation and submission."""
