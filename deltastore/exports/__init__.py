"""Versions written for other tools: PEFT LoRA, vLLM, GGUF LoRA and GGUF models."""
