"""Small hand-written model.c/model.h pairs for the board tests that need a model with a given
shape of cost (a long busy loop, an exact number of instructions, an oversized weight table),
following the generated-model contract (tsh_model_info, tsh_arena, tsh_model_run)."""
from __future__ import annotations

from pathlib import Path

HEADER = """#include <stdint.h>
typedef struct {
  const char *name; uint8_t input_dtype, output_dtype, input_rank, output_rank;
  uint16_t input_shape[4], output_shape[4];
  float input_scale; int32_t input_zero_point; float output_scale; int32_t output_zero_point;
  uint32_t input_bytes, output_bytes, arena_bytes, macs;
} tsh_model_info_t;
extern const tsh_model_info_t tsh_model_info;
extern int8_t tsh_arena[];
void tsh_model_run(const void *input, void *output);
#define TSH_MODEL_INPUT_BYTES 16
#define TSH_MODEL_OUTPUT_BYTES 16
"""


def write_model(d: Path, name: str, body: str, arena_bytes: int = 16, extra: str = "") -> Path:
    """model.c copying its 16-byte input to its output after running `body`."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "model.h").write_text(HEADER)
    (d / "model.c").write_text(f"""#include "model.h"
const tsh_model_info_t tsh_model_info = {{"{name}", 0, 0, 1, 1, {{16}}, {{16}}, 1.0f, 0, 1.0f, 0, 16, 16,
                                         {arena_bytes}u, 0}};
int8_t tsh_arena[{arena_bytes}] __attribute__((aligned(16)));
{extra}
void tsh_model_run(const void *input, void *output) {{
  const int8_t *x = input; int8_t *y = output;
  {body}
  for (int i = 0; i < 16; i++) y[i] = x[i];
}}
""")
    return d


def nops(d: Path, n: int) -> Path:
    """Exactly `n` extra instructions per inference (a straight run of NOPs)."""
    return write_model(d, f"nops-{n}", f'__asm volatile(".rept {n}\\n nop\\n .endr" ::: "memory");')


def busy(d: Path, iterations: int) -> Path:
    """An inference that takes seconds in the emulator."""
    return write_model(d, "busy", f"for (volatile uint32_t k = 0; k < {iterations}u; k++) {{}}")


def oversized(d: Path, weight_bytes: int = 0, arena_bytes: int = 16) -> Path:
    """A weight table of `weight_bytes` in flash and/or an arena of `arena_bytes` in RAM."""
    extra = f"static const int8_t weights[{weight_bytes}] = {{1}};" if weight_bytes else ""
    use = "y[0] = weights[x[0] & 0xF] + tsh_arena[x[1] & 0xF];" if weight_bytes else "tsh_arena[x[1] & 0xF] = 1;"
    return write_model(d, "oversized", use, arena_bytes=arena_bytes, extra=extra)
