"""Board profiles: what the firmware build, the linker script and the emulator need to know.

Facts about the emulated machines are QEMU 7.2's (see the design notes). The flash/RAM *budgets*
are what the linker script enforces; on `mps2-an386` they are deliberately smaller than QEMU's
4 MB / 4 MB so the board behaves like an STM32F746 (1 MB / 320 KB). `mps2-an386-4m` is the same emulated
machine with the memories the real Arm MPS2+ AN386 image has (Arm Application Note AN386: 4 MB ZBT SSRAM1 for
code at 0x0, 4 MB ZBT SSRAM2/3 for data at 0x2000_0000; QEMU's mps2-an386 maps the same two 4 MB RAMs): room for
models whose weights need more than 1 MB, e.g. an uncompressed int8 word table or every FC weight widened to
int16 for the Cortex-M4 loop (mcu/weight_layout.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from base.errors import TinyshieldError


@dataclass(frozen=True)
class Board:
    id: str
    machine: str                 # qemu-system-arm -M
    cpu: str                     # -mcpu for gcc
    fpu: str                     # -mfpu for gcc ("auto" lets -mcpu decide)
    flash_origin: int
    flash_bytes: int             # linker budget
    ram_origin: int
    ram_bytes: int               # linker budget
    uart: str                    # driver in mcu/firmware/uart_<uart>.c
    uart_base: int
    uart_irq: int                # external interrupt number of the UART's RX interrupt
    cpu_hz: int                  # SysTick clock (processor clock) as QEMU models it
    min_stack: int = 8 * 1024    # the linker refuses a build that leaves less stack than this
    description: str = ""
    extra_defines: tuple[tuple[str, str], ...] = ()

    def gcc_flags(self) -> list[str]:
        return [f"-mcpu={self.cpu}", "-mthumb", "-mfloat-abi=hard", f"-mfpu={self.fpu}"]

    def defines(self) -> dict[str, str]:
        """Preprocessor definitions the board-neutral firmware sources use."""
        return {"TSH_BOARD_ID": f'"{self.id}"', "TSH_UART_BASE": f"0x{self.uart_base:08X}u",
                "TSH_UART_IRQ": str(self.uart_irq), "TSH_CPU_HZ": f"{self.cpu_hz}u",
                f"TSH_UART_{self.uart.upper()}": "1", **dict(self.extra_defines)}


BOARDS: dict[str, Board] = {b.id: b for b in [
    Board("stm32f405", machine="netduinoplus2", cpu="cortex-m4", fpu="fpv4-sp-d16",
          flash_origin=0x0800_0000, flash_bytes=1024 * 1024, ram_origin=0x2000_0000, ram_bytes=192 * 1024,
          uart="stm32", uart_base=0x4001_1000, uart_irq=37, cpu_hz=168_000_000,
          description="STM32F405 (Cortex-M4F, DSP), QEMU netduinoplus2, USART1"),
    Board("mps2-an386", machine="mps2-an386", cpu="cortex-m4", fpu="fpv4-sp-d16",
          flash_origin=0x0000_0000, flash_bytes=1024 * 1024, ram_origin=0x2000_0000, ram_bytes=320 * 1024,
          uart="cmsdk", uart_base=0x4000_4000, uart_irq=0, cpu_hz=25_000_000,
          description="Cortex-M4F (DSP) with an STM32F746-sized budget, QEMU mps2-an386, CMSDK UART0"),
    Board("mps2-an386-4m", machine="mps2-an386", cpu="cortex-m4", fpu="fpv4-sp-d16",
          flash_origin=0x0000_0000, flash_bytes=4 * 1024 * 1024, ram_origin=0x2000_0000, ram_bytes=4 * 1024 * 1024,
          uart="cmsdk", uart_base=0x4000_4000, uart_irq=0, cpu_hz=25_000_000,
          description="Cortex-M4F (DSP) with the Arm MPS2+ AN386's full 4 MB code / 4 MB data SSRAM, QEMU mps2-an386"),
    Board("mps3-an547", machine="mps3-an547", cpu="cortex-m55", fpu="auto",
          flash_origin=0x0000_0000, flash_bytes=512 * 1024, ram_origin=0x2000_0000, ram_bytes=512 * 1024,
          uart="cmsdk", uart_base=0x4930_3000, uart_irq=33, cpu_hz=32_000_000,
          description="Cortex-M55 (Helium), QEMU mps3-an547, ITCM/DTCM, CMSDK UART0"),
]}

DEFAULT_BOARD = "stm32f405"


def board(board_id: str | None) -> Board:
    if board_id is None:
        board_id = DEFAULT_BOARD
    try:
        return BOARDS[board_id]
    except KeyError:
        raise TinyshieldError(f"unknown board {board_id!r}: choose one of {', '.join(BOARDS)}") from None


# What the firmware itself takes besides the model, the same on every board.
RUNTIME_FLASH = 8 * 1024       # the runtime and kernels take less flash than this; used for early refusals
# The runtime's own static RAM besides the arena and the I/O buffers: CRC table, UART frames, RX ring
# (5,212 B in the map file) plus alignment padding. The arena budget leaves it out; the link is exact.
RUNTIME_RAM = 5_376


def arena_budget(board_id: str, graph=None) -> int:
    """Bytes the arena may take on a board: RAM minus the firmware's minimum stack, the runtime's own static
    buffers and, given the graph, its input and output buffers — the same sum the firmware link checks. The one
    definition `plan`, `build` and the schedules' tile search use."""
    b = board(board_id)
    io = 0 if graph is None else sum(graph.tensors[n].nbytes for n in list(graph.inputs) + list(graph.outputs))
    return int(b.ram_bytes) - int(b.min_stack) - RUNTIME_RAM - io
