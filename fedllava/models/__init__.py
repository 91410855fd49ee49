"""Flax models: the FL ResNets and the server-side CLIP / LLaVA teachers."""
