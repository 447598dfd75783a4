"""The demo's tiny random-weight Hugging Face model (:mod:`tpfuse.models.hf_tiny`) and its fp64 oracle."""
