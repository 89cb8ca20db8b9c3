"""MCU deployment: a model's int8 graph on a microcontroller board, bit-exact with the host reference.

What lives here: the integer graph (`graph`) and the lowerings into it (`from_aten` from a captured
graph, `lower` the shared builder), the kernels' numpy reference and registry (`kernels`, with their C
twins in firmware/kernels), schedules (`schedules`, `tiled`), the memory planner (`planner`), C code
generation (`codegen`), boards (`boards`), firmware builds (`build`), emulation and flashing (`emulator`,
`flash`), the serial link and device protocol (`link`, `device`), on-device checks (`validate`,
`opprofile`), host builds of the kernels (`hostlib`), fleets and sweeps on Ray (`fleet`, `sweep`).

`mcu` imports `base` and `edge`; `tee` does not import it; `tools` and `tinyshield` may.
"""
