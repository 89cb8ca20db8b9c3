"""Edge side of tinyshield: models with real weights, data, compression, quantisation, LiteRT, MoE.

`edge` imports none of the other tinyshield packages.
"""
