"""Shadows: fire-and-forget copies to candidate models, their comparison with production, the verdict, promotion."""
