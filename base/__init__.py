"""The base layer every other tinyshield package stands on.

What lives here: the user-facing error type (`errors`), where artefacts are cached (`paths`), host C
builds (`cbuild`), the progress bar (`progress`), data sets (`data`) and the int8 arithmetic spec
(`quant`). `base` imports no other tinyshield package; everyone (edge, mcu, tee, tools) may import it.
"""
