"""The gRPC wire API (`poe_serving.proto`, package poe.v1) and its generated Python stubs."""
