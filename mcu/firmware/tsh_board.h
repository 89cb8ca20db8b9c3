/* Cortex-M core registers the runtime touches, and the UART driver interface.
 * Board specifics arrive as -D definitions from mcu/boards.py (TSH_UART_BASE, TSH_UART_IRQ, ...). */
#ifndef TSH_BOARD_H
#define TSH_BOARD_H
#include <stdint.h>

#define TSH_REG(addr) (*(volatile uint32_t *)(addr))

#define SCB_VTOR     TSH_REG(0xE000ED08u)
#define SCB_AIRCR    TSH_REG(0xE000ED0Cu)
#define SCB_CPACR    TSH_REG(0xE000ED88u)
#define NVIC_ISER(n) TSH_REG(0xE000E100u + 4u * (n))
#define SYST_CSR     TSH_REG(0xE000E010u)
#define SYST_RVR     TSH_REG(0xE000E014u)
#define SYST_CVR     TSH_REG(0xE000E018u)
#define DEMCR        TSH_REG(0xE000EDFCu)
#define DWT_CTRL     TSH_REG(0xE0001000u)
#define DWT_CYCCNT   TSH_REG(0xE0001004u)

static inline void tsh_irq_disable(void) { __asm volatile("cpsid i" ::: "memory"); }
static inline void tsh_irq_enable(void) { __asm volatile("cpsie i" ::: "memory"); }
static inline void tsh_wfi(void) { __asm volatile("wfi" ::: "memory"); }
static inline void tsh_nvic_enable(unsigned irq) { NVIC_ISER(irq / 32u) = 1u << (irq % 32u); }

/* UART driver (uart.c): received bytes land in a ring buffer from the RX interrupt; when the ring
 * is full the driver stops taking bytes (the UART holds them), so nothing is ever dropped on the
 * device side. */
void uart_init(void);
void uart_write(const uint8_t *data, uint32_t n);
int uart_read(void);          /* next received byte, or -1 when none is waiting */
int uart_rx_pending(void);    /* nonzero when a byte is waiting */
void uart_flush(void);        /* wait until everything written has left */
void uart_isr(void);

/* The board's UART registers (uart_stm32.c or uart_cmsdk.c), all uart.c needs. */
void uart_hw_init(void);             /* rate, TX, RX and its interrupt on */
int uart_hw_tx_full(void);           /* nonzero while the transmitter cannot take a byte */
void uart_hw_tx(uint8_t b);
int uart_hw_rx_ready(void);          /* nonzero while a received byte waits in the UART */
uint8_t uart_hw_rx(void);
void uart_hw_rx_irq(int on);         /* the RX interrupt on (1) or off (0) */
int uart_hw_rx_irq_on(void);
void uart_hw_rx_irq_ack(void);       /* clear the RX interrupt request, where the UART needs it */

/* Received-byte ring of uart.c. */
#define TSH_RING_BYTES 2048u
typedef struct {
  volatile uint32_t head, tail;   /* head written by the ISR, tail by the main loop */
  uint8_t data[TSH_RING_BYTES];
} tsh_ring_t;
extern tsh_ring_t tsh_rx_ring;
static inline int tsh_ring_full(const tsh_ring_t *r) { return r->head - r->tail >= TSH_RING_BYTES; }
static inline int tsh_ring_empty(const tsh_ring_t *r) { return r->head == r->tail; }

#endif
