/* STM32F4 USART registers (QEMU netduinoplus2: USART1); the buffered driver is uart.c. */
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

void uart_hw_init(void) {
  USART_BRR = TSH_CPU_HZ / 2u / 115200u;   /* APB2 = HCLK/2; QEMU ignores the rate */
  USART_CR1 = CR1_UE | CR1_TE | CR1_RE | CR1_RXNEIE;
}

int uart_hw_tx_full(void) { return !(USART_SR & SR_TXE); }
void uart_hw_tx(uint8_t b) { USART_DR = b; }
int uart_hw_rx_ready(void) { return (USART_SR & SR_RXNE) != 0; }
uint8_t uart_hw_rx(void) { return (uint8_t)USART_DR; }    /* reading DR clears RXNE */
void uart_hw_rx_irq_ack(void) {}                          /* nothing to clear: RXNE is the request */
int uart_hw_rx_irq_on(void) { return (USART_CR1 & CR1_RXNEIE) != 0; }

void uart_hw_rx_irq(int on) {
  if (on) USART_CR1 |= CR1_RXNEIE;
  else USART_CR1 &= ~CR1_RXNEIE;
}
