"""
Experiments built on the library: the small-scale CLTS/MDLRC study (``experiments.study``) and the
paper's Table 1 and Figs. 1-4 measured at its scale (``experiments.figures``).

Research code lives here, beside ``evaluations/``, so that ``guided_diffusion`` stays the
library that training and sampling import.
"""
