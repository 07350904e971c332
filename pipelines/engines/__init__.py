"""Engines: thin adapters that run the core's stages (local, Ray Data, Apache Beam)."""
