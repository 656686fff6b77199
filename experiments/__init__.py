"""
Experiments built on the library: the small-scale CLTS/MDLRC study (``experiments.study``).

Research code lives here, beside ``evaluations/``, so that ``guided_diffusion`` stays the
library that training and sampling import.
"""
