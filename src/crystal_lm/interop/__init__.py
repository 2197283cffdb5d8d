"""Interop: LLM360's Hugging Face layout (`llm360`) and transformers' Auto classes (`hf_model`)."""
