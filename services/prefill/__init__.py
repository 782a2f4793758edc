"""Prefill worker: computes prompts' KV and ships it to decode workers."""
