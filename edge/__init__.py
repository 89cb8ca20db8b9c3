"""Models and what is done to them on the host: model definitions with real weights (`models`), training
recipes and the weights they ship (`recipes`) over one training loop (`train`), capture to a graph
(`capture`), INPUT arguments to model inputs (`inputs`), compression (`compress`), LiteRT/TFLite export and
runtimes (`litert`), MoE expert caching (`moe`).

`edge` imports `base` and none of the other tinyshield packages; `mcu`, `tee` and `tools` may import it.
"""
