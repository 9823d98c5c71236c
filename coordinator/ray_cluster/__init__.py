"""The Ray lifecycle: stage workers in Ray actors, and poe-serve as a Ray Serve app."""
