"""MONAI 3D latent diffusion generator (the only place importing MONAI generative parts)."""
