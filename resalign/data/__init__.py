"""Datasets: image–caption pairs (imagefolder, digits, DreamBooth, poison mixes, harvested)
and prompt lists. Submodules import torch; import them directly."""
