"""The gRPC front: the PoEServing and PoEAdmin servicers and the proto <-> request mapping."""
