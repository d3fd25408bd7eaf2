"""Neuron-facing code. ``hooks`` is safe to import anywhere; ``modeling`` imports the Neuron SDK."""
