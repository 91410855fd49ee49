"""fedllava: MLLM-assisted federated learning (MLLM-LLaVA-FL) in JAX/Flax."""
