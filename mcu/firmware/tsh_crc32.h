#ifndef TSH_CRC32_H
#define TSH_CRC32_H
#include <stdint.h>
void tsh_crc32_init(void);
/* Start with crc = 0; feed pieces in order. */
uint32_t tsh_crc32_update(uint32_t crc, const uint8_t *p, uint32_t n);
#endif
