"""musev_lite: MuseV's visual-conditioned parallel denoising in plain PyTorch."""

__version__ = "0.1.0"
