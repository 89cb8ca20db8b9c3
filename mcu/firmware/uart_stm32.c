/* STM32F4 USART driver (QEMU netduinoplus2: USART1). */
#include "tsh_board.h"

#define USART_SR   TSH_REG(TSH_UART_BASE + 0x0u)
#define USART_DR   TSH_REG(TSH_UART_BASE + 0x4u)
#define USART_BRR  TSH_REG(TSH_UART_BASE + 0x8u)
#define USART_CR1  TSH_REG(TSH_UART_BASE + 0xCu)
#define SR_RXNE    (1u << 5)
#define SR_TXE     (1u << 7)
#define CR1_RE     (1u << 2)
#define CR1_TE     (1u << 3)
#define CR1_RXNEIE (1u << 5)
#define CR1_UE     (1u << 13)

tsh_ring_t tsh_rx_ring;

void uart_init(void) {
  USART_BRR = TSH_CPU_HZ / 2u / 115200u;   /* APB2 = HCLK/2; QEMU ignores the rate */
  USART_CR1 = CR1_UE | CR1_TE | CR1_RE | CR1_RXNEIE;
  tsh_nvic_enable(TSH_UART_IRQ);
}

void uart_write(const uint8_t *data, uint32_t n) {
  for (uint32_t i = 0; i < n; i++) {
    while (!(USART_SR & SR_TXE)) {}
    USART_DR = data[i];
  }
}

void uart_flush(void) { while (!(USART_SR & SR_TXE)) {} }

void uart_isr(void) {
  tsh_ring_t *r = &tsh_rx_ring;
  while (USART_SR & SR_RXNE) {
    if (tsh_ring_full(r)) {          /* leave the byte in DR; resume when the ring drains */
      USART_CR1 &= ~CR1_RXNEIE;
      return;
    }
    r->data[r->head % TSH_RING_BYTES] = (uint8_t)USART_DR;
    r->head++;
  }
}

int uart_rx_pending(void) { return !tsh_ring_empty(&tsh_rx_ring); }

/* The ISR stopped taking bytes when the ring was full: drain the UART by hand, then let it
 * interrupt again. (Re-enabling alone is not enough: the CMSDK UART raises no interrupt for a
 * byte that arrived while its RX interrupt was off.) */
static void resume_rx(void) {
  tsh_irq_disable();
  USART_CR1 |= CR1_RXNEIE;
  uart_isr();
  tsh_irq_enable();
}

int uart_read(void) {
  tsh_ring_t *r = &tsh_rx_ring;
  if (tsh_ring_empty(r)) {
    if (!(USART_CR1 & CR1_RXNEIE)) resume_rx();
    return -1;
  }
  int c = r->data[r->tail % TSH_RING_BYTES];
  r->tail++;
  if (!(USART_CR1 & CR1_RXNEIE)) resume_rx();
  return c;
}
