"""What this machine can do: GPU/DALI/ONNX Runtime probes and device selection."""
