"""Exporters: ONNX (fp32, int8 QDQ, int4), the packed .ecz artifact, TFLite and C."""
