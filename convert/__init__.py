"""Converters from published checkpoints to musev_lite's weight format (`musev_lite.convert`)."""
