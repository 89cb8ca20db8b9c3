"""The base layer every other tinyshield package stands on.

What lives here: the user-facing error type and the internal one (`errors`), where artefacts are cached
(`paths`), host C builds and reading C declarations (`cbuild`), the progress bar (`progress`), data sets
(`data`), the int8 arithmetic spec (`quant`), byte/parameter sizes (`sizes`) and the optional Ray helpers
shared by fleets and sweeps (`cluster`). `base` imports no other tinyshield package; everyone (edge, mcu, tee,
tools) may import it.
"""
