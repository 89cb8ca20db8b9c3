/* The buffered UART driver every board shares: a receive ring filled by the RX interrupt, with flow
 * control by holding bytes in the UART when the ring is full. The register work is the board's
 * (uart_hw_* in uart_stm32.c or uart_cmsdk.c). */
#include "tsh_board.h"

tsh_ring_t tsh_rx_ring;

void uart_init(void) {
  uart_hw_init();
  tsh_nvic_enable(TSH_UART_IRQ);
}

void uart_write(const uint8_t *data, uint32_t n) {
  for (uint32_t i = 0; i < n; i++) {
    while (uart_hw_tx_full()) {}
    uart_hw_tx(data[i]);
  }
}

void uart_flush(void) { while (uart_hw_tx_full()) {} }

void uart_isr(void) {
  tsh_ring_t *r = &tsh_rx_ring;
  uart_hw_rx_irq_ack();
  while (uart_hw_rx_ready()) {
    if (tsh_ring_full(r)) {          /* leave the byte in the UART; resume when the ring drains */
      uart_hw_rx_irq(0);
      return;
    }
    r->data[r->head % TSH_RING_BYTES] = uart_hw_rx();
    r->head++;
  }
}

int uart_rx_pending(void) { return !tsh_ring_empty(&tsh_rx_ring); }

/* The ISR stopped taking bytes when the ring was full: drain the UART by hand, then let it
 * interrupt again. (Re-enabling alone is not enough on every UART: the CMSDK one raises no
 * interrupt for a byte that arrived while its RX interrupt was off.) */
static void resume_rx(void) {
  tsh_irq_disable();
  uart_hw_rx_irq(1);
  uart_isr();
  tsh_irq_enable();
}

int uart_read(void) {
  tsh_ring_t *r = &tsh_rx_ring;
  if (tsh_ring_empty(r)) {
    if (!uart_hw_rx_irq_on()) resume_rx();
    return -1;
  }
  int c = r->data[r->tail % TSH_RING_BYTES];
  r->tail++;
  if (!uart_hw_rx_irq_on()) resume_rx();
  return c;
}
