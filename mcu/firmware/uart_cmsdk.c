/* ARM CMSDK APB UART driver (QEMU mps2-an386 UART0, mps3-an547 UART0). */
#include "tsh_board.h"

#define UART_DATA     TSH_REG(TSH_UART_BASE + 0x00u)
#define UART_STATE    TSH_REG(TSH_UART_BASE + 0x04u)
#define UART_CTRL     TSH_REG(TSH_UART_BASE + 0x08u)
#define UART_INTCLR   TSH_REG(TSH_UART_BASE + 0x0Cu)
#define UART_BAUDDIV  TSH_REG(TSH_UART_BASE + 0x10u)
#define STATE_TXFULL  (1u << 0)
#define STATE_RXFULL  (1u << 1)
#define CTRL_TX_EN    (1u << 0)
#define CTRL_RX_EN    (1u << 1)
#define CTRL_RX_INTEN (1u << 3)
#define INT_RX        (1u << 1)

tsh_ring_t tsh_rx_ring;

void uart_init(void) {
  UART_BAUDDIV = TSH_CPU_HZ / 115200u;
  UART_CTRL = CTRL_TX_EN | CTRL_RX_EN | CTRL_RX_INTEN;
  tsh_nvic_enable(TSH_UART_IRQ);
}

void uart_write(const uint8_t *data, uint32_t n) {
  for (uint32_t i = 0; i < n; i++) {
    while (UART_STATE & STATE_TXFULL) {}
    UART_DATA = data[i];
  }
}

void uart_flush(void) { while (UART_STATE & STATE_TXFULL) {} }

void uart_isr(void) {
  tsh_ring_t *r = &tsh_rx_ring;
  UART_INTCLR = INT_RX;
  while (UART_STATE & STATE_RXFULL) {
    if (tsh_ring_full(r)) {          /* leave the byte in the UART; resume when the ring drains */
      UART_CTRL &= ~CTRL_RX_INTEN;
      return;
    }
    r->data[r->head % TSH_RING_BYTES] = (uint8_t)UART_DATA;
    r->head++;
  }
}

int uart_rx_pending(void) { return !tsh_ring_empty(&tsh_rx_ring); }

/* The ISR stopped taking bytes when the ring was full: drain the UART by hand, then let it
 * interrupt again. (Re-enabling alone is not enough: the CMSDK UART raises no interrupt for a
 * byte that arrived while its RX interrupt was off.) */
static void resume_rx(void) {
  tsh_irq_disable();
  UART_CTRL |= CTRL_RX_INTEN;
  uart_isr();
  tsh_irq_enable();
}

int uart_read(void) {
  tsh_ring_t *r = &tsh_rx_ring;
  if (tsh_ring_empty(r)) {
    if (!(UART_CTRL & CTRL_RX_INTEN)) resume_rx();
    return -1;
  }
  int c = r->data[r->tail % TSH_RING_BYTES];
  r->tail++;
  if (!(UART_CTRL & CTRL_RX_INTEN)) resume_rx();
  return c;
}
