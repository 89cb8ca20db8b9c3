"""The base layer every other tinyshield package stands on.

What lives here: the error types (`errors`: what the user can fix, and internal errors), where
artefacts are cached (`paths`), host C builds and reading C declarations (`cbuild`), the progress bar
(`progress`), data sets (`data`), the int8 arithmetic spec (`quant`) and sizes users write (`sizes`).
`base` imports no other tinyshield package; everyone (edge, mcu, tee, tools) may import it.
"""
