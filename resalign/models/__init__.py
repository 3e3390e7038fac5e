"""Models: loading SD/SDXL/tiny into a ModelBundle, saving LoRA/merged outputs, pretraining
the tiny demo model. Submodules import torch; import them directly."""
