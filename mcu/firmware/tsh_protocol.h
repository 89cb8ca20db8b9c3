/* The serial protocol, device side. mcu/link.py is the host side; tests/test_contracts.py checks
 * that its constants match these.
 *
 * Frame:  0xA5 0x5A | cmd u8 | seq u8 | len u16 LE | payload[len] | crc32 u32 LE
 * The CRC (zlib's CRC-32) covers cmd, seq, len and payload. A reply carries cmd | 0x80 and the
 * request's seq; a malformed request gets an ERROR frame (code, cmd, detail) instead. All
 * multi-byte fields are little endian. */
#ifndef TSH_PROTOCOL_H
#define TSH_PROTOCOL_H

#define TSH_PROTOCOL_VERSION 1
#define TSH_SYNC0 0xA5u
#define TSH_SYNC1 0x5Au
#define TSH_MAX_PAYLOAD 1040u          /* 1 KiB of data + an offset header */
#define TSH_REPLY 0x80u

enum {
  TSH_CMD_INFO = 0x01,      /* -> model descriptor + firmware facts */
  TSH_CMD_UPLOAD = 0x02,    /* u32 offset, bytes -> u32 end offset */
  TSH_CMD_RUN = 0x03,       /* -> u32 run index, u32 cycles, u32 stack high-water */
  TSH_CMD_DOWNLOAD = 0x04,  /* u32 offset, u32 length -> bytes */
  TSH_CMD_STATS = 0x05,     /* -> counters, see main.c */
  TSH_CMD_RESET = 0x06,     /* -> empty reply, then a system reset */
  TSH_CMD_ECHO = 0x07,      /* -> the payload back */
  /* Tap builds only (model.h defines TSH_MODEL_TAPS); other firmware answers TSH_ERR_COMMAND. */
  TSH_CMD_STEP = 0x08,      /* u32 segment k -> u32 k, u32 stack high-water of the segment */
  TSH_CMD_PEEK = 0x09,      /* u32 arena offset, u32 length -> arena bytes */
  TSH_CMD_ERROR = 0x7F,     /* device -> host: u8 code, u8 cmd, u16 detail */
};

enum {
  TSH_ERR_CRC = 1,          /* checksum mismatch */
  TSH_ERR_LENGTH = 2,       /* declared length above TSH_MAX_PAYLOAD */
  TSH_ERR_COMMAND = 3,      /* unknown command */
  TSH_ERR_ARGUMENT = 4,     /* payload malformed or out of range */
  TSH_ERR_TIMEOUT = 5,      /* frame stopped arriving part way */
};

#endif
