"""Rectified flow: the training objective, the samplers, and the inference pipeline that loads a
checkpoint and generates images."""
