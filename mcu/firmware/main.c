/* The device runtime: answers the host's framed requests (tsh_protocol.h) and runs the generated
 * model (model.h) between two marker functions that the instruction-count plugin watches. */
#include <stdint.h>
#include <string.h>
#include "model.h"
#include "tsh_board.h"
#include "tsh_crc32.h"
#include "tsh_protocol.h"

#ifndef TSH_INPUT_BYTES
#error "TSH_INPUT_BYTES must be defined (mcu/build.py passes the model's input size)"
#endif
#ifndef TSH_OUTPUT_BYTES
#error "TSH_OUTPUT_BYTES must be defined (mcu/build.py passes the model's output size)"
#endif

#define STACK_PAINT 0xC5C5C5C5u
#define FRAME_TIMEOUT_TICKS 20u          /* 200 ms at 100 Hz without a byte ends a partial frame */

extern uint32_t __stack_bottom[], __stack_top[], __data_start[], __bss_end[];

static uint8_t tsh_input[TSH_INPUT_BYTES] __attribute__((aligned(16)));
static uint8_t tsh_output[TSH_OUTPUT_BYTES] __attribute__((aligned(16)));
static uint8_t rx[6 + TSH_MAX_PAYLOAD + 4];
static uint8_t tx[6 + TSH_MAX_PAYLOAD + 4];

static volatile uint32_t ticks;
static struct {
  uint32_t runs, last_cycles, stack_last, stack_max;
  uint32_t frames_ok, frames_crc, frames_malformed;
} stats;

void SysTick_Handler(void) { ticks++; }

/* The plugin counts instructions from the first instruction of tsh_mark_begin to the first of
 * tsh_mark_end. noipa keeps each a real, separate function at its own address. */
__attribute__((noipa, used)) void tsh_mark_begin(void) { __asm volatile("nop" ::: "memory"); }
__attribute__((noipa, used)) void tsh_mark_end(void) { __asm volatile("nop\n nop" ::: "memory"); }

/* Stack painting: fill the unused stack with a pattern; the deepest overwritten word is the
 * high-water mark. Called at reset and before every inference. */
__attribute__((noinline)) void tsh_stack_paint(void) {
  uint32_t *sp;
  __asm volatile("mov %0, sp" : "=r"(sp));
  for (uint32_t *p = __stack_bottom; p < sp - 16; p++) *p = STACK_PAINT;
}

static uint32_t stack_high_water(void) {
  const uint32_t *p = __stack_bottom;
  while (p < __stack_top && *p == STACK_PAINT) p++;
  return (uint32_t)((const char *)__stack_top - (const char *)p);
}

static inline void put_u16(uint8_t *p, uint32_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static inline void put_u32(uint8_t *p, uint32_t v) {
  p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); p[2] = (uint8_t)(v >> 16); p[3] = (uint8_t)(v >> 24);
}
static inline uint32_t get_u32(const uint8_t *p) {
  return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void send(uint8_t cmd, uint8_t seq, uint32_t len) {  /* payload already in tx + 6 */
  tx[0] = TSH_SYNC0; tx[1] = TSH_SYNC1; tx[2] = cmd; tx[3] = seq;
  put_u16(tx + 4, len);
  put_u32(tx + 6 + len, tsh_crc32_update(0, tx + 2, 4 + len));
  uart_write(tx, 6 + len + 4);
}

static void send_error(uint8_t seq, uint8_t code, uint8_t cmd, uint32_t detail) {
  tx[6] = code; tx[7] = cmd;
  put_u16(tx + 8, detail);
  send(TSH_CMD_ERROR, seq, 4);
}

static uint32_t put_str(uint8_t *p, const char *s) {
  uint32_t n = (uint32_t)strlen(s);
  if (n > 64) n = 64;
  p[0] = (uint8_t)n;
  memcpy(p + 1, s, n);
  return 1 + n;
}

static uint32_t info_payload(uint8_t *p) {
  const tsh_model_info_t *m = &tsh_model_info;
  uint8_t *q = p;
  *q++ = TSH_PROTOCOL_VERSION; *q++ = m->input_dtype; *q++ = m->output_dtype;
  *q++ = m->input_rank; *q++ = m->output_rank; *q++ = 0; *q++ = 0; *q++ = 0;
  for (int i = 0; i < 4; i++, q += 2) put_u16(q, m->input_shape[i]);
  for (int i = 0; i < 4; i++, q += 2) put_u16(q, m->output_shape[i]);
  memcpy(q, &m->input_scale, 4); q += 4;
  put_u32(q, (uint32_t)m->input_zero_point); q += 4;
  memcpy(q, &m->output_scale, 4); q += 4;
  put_u32(q, (uint32_t)m->output_zero_point); q += 4;
  put_u32(q, m->input_bytes); q += 4;
  put_u32(q, m->output_bytes); q += 4;
  put_u32(q, m->arena_bytes); q += 4;
  put_u32(q, m->macs); q += 4;
  put_u32(q, (uint32_t)((char *)__bss_end - (char *)__data_start)); q += 4;  /* static RAM */
  put_u32(q, (uint32_t)((char *)__stack_top - (char *)__stack_bottom)); q += 4;
  put_u32(q, TSH_INPUT_BYTES); q += 4;
  put_u32(q, TSH_OUTPUT_BYTES); q += 4;
  put_u32(q, TSH_MAX_PAYLOAD); q += 4;
  q += put_str(q, m->name);
  q += put_str(q, TSH_BOARD_ID);
  return (uint32_t)(q - p);
}

static uint32_t run_model(void) {
  tsh_irq_disable();                 /* nothing but the model between the markers */
  tsh_stack_paint();
  uint32_t c0 = DWT_CYCCNT;
  tsh_mark_begin();
  tsh_model_run(tsh_input, tsh_output);
  tsh_mark_end();
  uint32_t c1 = DWT_CYCCNT;
  tsh_irq_enable();
  stats.runs++;
  stats.last_cycles = c1 - c0;
  stats.stack_last = stack_high_water();
  if (stats.stack_last > stats.stack_max) stats.stack_max = stats.stack_last;
  return stats.runs;
}

static void handle(uint8_t cmd, uint8_t seq, const uint8_t *pl, uint32_t len) {
  uint8_t *out = tx + 6;
  switch (cmd) {
  case TSH_CMD_INFO:
    send(cmd | TSH_REPLY, seq, info_payload(out));
    return;
  case TSH_CMD_UPLOAD: {
    if (len < 4) break;
    uint32_t off = get_u32(pl), n = len - 4;
    if (off > TSH_INPUT_BYTES || n > TSH_INPUT_BYTES - off) break;
    memcpy(tsh_input + off, pl + 4, n);
    put_u32(out, off + n);
    send(cmd | TSH_REPLY, seq, 4);
    return;
  }
  case TSH_CMD_RUN:
    if (len != 0) break;
    put_u32(out, run_model());
    put_u32(out + 4, stats.last_cycles);
    put_u32(out + 8, stats.stack_last);
    send(cmd | TSH_REPLY, seq, 12);
    return;
  case TSH_CMD_DOWNLOAD: {
    if (len != 8) break;
    uint32_t off = get_u32(pl), n = get_u32(pl + 4);
    if (off > TSH_OUTPUT_BYTES || n > TSH_OUTPUT_BYTES - off || n > TSH_MAX_PAYLOAD) break;
    memcpy(out, tsh_output + off, n);
    send(cmd | TSH_REPLY, seq, n);
    return;
  }
  case TSH_CMD_STATS: {
    const uint32_t v[] = {stats.runs, stats.last_cycles, stats.stack_last, stats.stack_max,
                          (uint32_t)((char *)__stack_top - (char *)__stack_bottom),
                          tsh_model_info.arena_bytes, TSH_INPUT_BYTES + TSH_OUTPUT_BYTES,
                          (uint32_t)((char *)__bss_end - (char *)__data_start),
                          stats.frames_ok, stats.frames_crc, stats.frames_malformed};
    for (uint32_t i = 0; i < sizeof v / sizeof v[0]; i++) put_u32(out + 4 * i, v[i]);
    send(cmd | TSH_REPLY, seq, sizeof v);
    return;
  }
  case TSH_CMD_RESET:
    if (len != 0) break;
    send(cmd | TSH_REPLY, seq, 0);
    uart_flush();
    __asm volatile("dsb" ::: "memory");
    SCB_AIRCR = 0x05FA0004u;           /* SYSRESETREQ */
    for (;;) {}
  case TSH_CMD_ECHO:
    memcpy(out, pl, len);
    send(cmd | TSH_REPLY, seq, len);
    return;
#ifdef TSH_MODEL_TAPS
  case TSH_CMD_STEP: {              /* one segment of the inference; the host reads its output next */
    if (len != 4) break;
    uint32_t k = get_u32(pl);
    if (k >= TSH_MODEL_SEGMENTS) break;
    tsh_stack_paint();
    tsh_model_segment(k, tsh_input, tsh_output);
    put_u32(out, k);
    put_u32(out + 4, stack_high_water());
    send(cmd | TSH_REPLY, seq, 8);
    return;
  }
  case TSH_CMD_PEEK: {
    if (len != 8) break;
    uint32_t off = get_u32(pl), n = get_u32(pl + 4);
    if (off > TSH_MODEL_ARENA_BYTES || n > TSH_MODEL_ARENA_BYTES - off || n > TSH_MAX_PAYLOAD) break;
    memcpy(out, (const uint8_t *)tsh_arena + off, n);
    send(cmd | TSH_REPLY, seq, n);
    return;
  }
#endif
  default:
    stats.frames_malformed++;
    send_error(seq, TSH_ERR_COMMAND, cmd, 0);
    return;
  }
  stats.frames_malformed++;
  send_error(seq, TSH_ERR_ARGUMENT, cmd, len);
}

/* Next byte, sleeping until one arrives; -1 when `since` is more than the frame timeout ago. */
static int next_byte(int in_frame, uint32_t since) {
  for (;;) {
    int c = uart_read();
    if (c >= 0) return c;
    if (in_frame && ticks - since > FRAME_TIMEOUT_TICKS) return -1;
    tsh_irq_disable();               /* check-then-sleep without losing a wake-up */
    if (!uart_rx_pending()) tsh_wfi();
    tsh_irq_enable();
  }
}

static void serve(void) {
  for (;;) {
    /* Hunt for the sync pair; anything else is line noise. */
    if (next_byte(0, 0) != TSH_SYNC0) continue;
    int c;
    uint32_t t = ticks;
    while ((c = next_byte(1, t)) == TSH_SYNC0) t = ticks;
    if (c != TSH_SYNC1) continue;
    uint32_t got = 0, need = 4;        /* cmd, seq, len */
    int timed_out = 0;
    while (got < need) {
      t = ticks;
      c = next_byte(1, t);
      if (c < 0) { timed_out = 1; break; }
      rx[got++] = (uint8_t)c;
      if (got == 4) {
        uint32_t len = (uint32_t)rx[2] | (uint32_t)rx[3] << 8;
        if (len > TSH_MAX_PAYLOAD) break;
        need = 4 + len + 4;
      }
    }
    uint32_t len = (uint32_t)rx[2] | (uint32_t)rx[3] << 8;
    if (timed_out) {
      stats.frames_malformed++;
      send_error(got > 1 ? rx[1] : 0, TSH_ERR_TIMEOUT, got > 0 ? rx[0] : 0, got);
      continue;
    }
    if (need == 4) {                   /* length field over the limit */
      stats.frames_malformed++;
      send_error(rx[1], TSH_ERR_LENGTH, rx[0], len);
      continue;
    }
    uint32_t crc = get_u32(rx + 4 + len);
    if (crc != tsh_crc32_update(0, rx, 4 + len)) {
      stats.frames_crc++;
      send_error(rx[1], TSH_ERR_CRC, rx[0], 0);
      continue;
    }
    stats.frames_ok++;
    handle(rx[0], rx[1], rx + 4, len);
  }
}

int main(void) {
  tsh_crc32_init();
  DEMCR |= 1u << 24;                   /* TRCENA, then the cycle counter (reads 0 in QEMU) */
  DWT_CYCCNT = 0;
  DWT_CTRL |= 1u;
  SYST_RVR = TSH_CPU_HZ / 100u - 1u;   /* 100 Hz tick for frame timeouts */
  SYST_CVR = 0;
  SYST_CSR = 7u;                       /* processor clock, interrupt, enable */
  uart_init();
  serve();
  return 0;
}
