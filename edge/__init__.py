"""Models and what is done to them on the host: model definitions and recipes (`models`, `recipes`),
capture to a graph (`capture`), compression (`compress`), LiteRT export (`litert`), MoE (`moe`).

`edge` imports `base` and none of the other tinyshield packages; `mcu`, `tee` and `tools` may import it.
"""
