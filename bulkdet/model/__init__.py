"""The model tools: what an ONNX detector is, precision preparation, NMS in the graph."""
