/* ARM CMSDK APB UART registers (QEMU mps2-an386 UART0, mps3-an547 UART0); the buffered driver is uart.c. */
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

void uart_hw_init(void) {
  UART_BAUDDIV = TSH_CPU_HZ / 115200u;
  UART_CTRL = CTRL_TX_EN | CTRL_RX_EN | CTRL_RX_INTEN;
}

int uart_hw_tx_full(void) { return (UART_STATE & STATE_TXFULL) != 0; }
void uart_hw_tx(uint8_t b) { UART_DATA = b; }
int uart_hw_rx_ready(void) { return (UART_STATE & STATE_RXFULL) != 0; }
uint8_t uart_hw_rx(void) { return (uint8_t)UART_DATA; }
void uart_hw_rx_irq_ack(void) { UART_INTCLR = INT_RX; }
int uart_hw_rx_irq_on(void) { return (UART_CTRL & CTRL_RX_INTEN) != 0; }

void uart_hw_rx_irq(int on) {
  if (on) UART_CTRL |= CTRL_RX_INTEN;
  else UART_CTRL &= ~CTRL_RX_INTEN;
}
