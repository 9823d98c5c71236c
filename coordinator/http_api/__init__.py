"""The OpenAI-compatible HTTP front: FastAPI app, JSON bodies and their mapping to requests."""
