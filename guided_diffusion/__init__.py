"""
Guided-Diffusion compatible diffusion models, with the faster-training methods of
Xu et al. (2024): CLTS (curriculum timestep schedule) and MDLRC (momentum decay with
learning-rate compensation).
"""
