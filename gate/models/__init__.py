"""The bundled default models (encoder, index, generator), trained on MSD Task04 Hippocampus.

Data: Medical Segmentation Decathlon Task04_Hippocampus (Vanderbilt University Medical Center),
CC-BY-SA 4.0; Simpson et al. 2019 (arXiv:1902.09063), Antonelli et al. 2022 (Nat. Commun.).
Material derived from it (these weights) is shared alike under CC-BY-SA 4.0.
"""
