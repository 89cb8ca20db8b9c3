/* CRC-32 (IEEE 802.3, reflected, poly 0xEDB88320) — the same value as Python's zlib.crc32. */
#include "tsh_crc32.h"

static uint32_t table[256];

void tsh_crc32_init(void) {
  for (uint32_t i = 0; i < 256; i++) {
    uint32_t c = i;
    for (int k = 0; k < 8; k++) c = (c & 1u) ? (c >> 1) ^ 0xEDB88320u : c >> 1;
    table[i] = c;
  }
}

uint32_t tsh_crc32_update(uint32_t crc, const uint8_t *p, uint32_t n) {
  crc = ~crc;
  while (n--) crc = table[(crc ^ *p++) & 0xFFu] ^ (crc >> 8);
  return ~crc;
}
