"""The decision core: requests, modes, scheduling and the engine that steps them over stage workers."""
