/* Reset handler and vector table, the same for every board. The UART's interrupt number comes
 * from the board profile (-DTSH_UART_IRQ). */
#include <stdint.h>
#include <string.h>
#include "tsh_board.h"

extern uint32_t __data_load[], __data_start[], __data_end[], __bss_start[], __bss_end[];
extern uint32_t __stack_bottom[], __stack_top[];
int main(void);
void tsh_stack_paint(void);
void SysTick_Handler(void);

#define TSH_EXTERNAL_IRQS 128

void Reset_Handler(void);

static void fault_handler(void) {
  /* A fault is a firmware bug: stop here so a debugger (or the host's timeout) sees it. */
  for (;;) tsh_wfi();
}

static void default_handler(void) {}

typedef void (*vector_t)(void);

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Woverride-init"
__attribute__((section(".vectors"), used, aligned(1024)))
const vector_t tsh_vectors[16 + TSH_EXTERNAL_IRQS] = {
  [0] = (vector_t)(uintptr_t)__stack_top,
  [1] = Reset_Handler,
  [2 ... 15] = fault_handler,          /* NMI, HardFault, MemManage, BusFault, UsageFault, ... */
  [11] = default_handler,              /* SVCall */
  [14] = default_handler,              /* PendSV */
  [15] = SysTick_Handler,
  [16 ... 16 + TSH_EXTERNAL_IRQS - 1] = default_handler,
  [16 + TSH_UART_IRQ] = uart_isr,
};
#pragma GCC diagnostic pop

void Reset_Handler(void) {
  memcpy(__data_start, __data_load, (size_t)((char *)__data_end - (char *)__data_start));
  memset(__bss_start, 0, (size_t)((char *)__bss_end - (char *)__bss_start));
  SCB_VTOR = (uint32_t)(uintptr_t)tsh_vectors;
  SCB_CPACR |= 0xFu << 20;             /* CP10/CP11: the FPU, for -mfloat-abi=hard code */
  __asm volatile("dsb\n isb" ::: "memory");
  tsh_stack_paint();
  main();
  for (;;) tsh_wfi();
}
