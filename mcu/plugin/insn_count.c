/* tinyshield instruction counter: a QEMU TCG plugin (plugin API v1, QEMU 7.x).
 *
 * Counts the guest instructions executed from the first instruction of the function at `begin=`
 * to the first instruction of the function at `end=` (the firmware's tsh_mark_begin and
 * tsh_mark_end), and after each such interval rewrites the file `out=` with one line:
 * "<intervals so far> <instructions in the last interval>".
 *
 * Counting is exact and cheap: every translated block adds its length to a counter with an
 * inline operation at block entry; the two marker instructions get a callback that subtracts the
 * part of their block not yet executed. Interrupts are masked by the firmware between the markers.
 *
 * Debian ships no qemu-plugin.h, so the few API v1 declarations used are written out below. */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

typedef uint64_t qemu_plugin_id_t;
typedef struct qemu_info_t qemu_info_t;  /* not read */
struct qemu_plugin_tb;
struct qemu_plugin_insn;
enum qemu_plugin_cb_flags { QEMU_PLUGIN_CB_NO_REGS, QEMU_PLUGIN_CB_R_REGS, QEMU_PLUGIN_CB_RW_REGS };
enum qemu_plugin_op { QEMU_PLUGIN_INLINE_ADD_U64 };
typedef void (*tb_trans_cb_t)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);
typedef void (*vcpu_udata_cb_t)(unsigned int vcpu_index, void *userdata);

void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, tb_trans_cb_t cb);
void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb *tb, enum qemu_plugin_op op,
                                              void *ptr, uint64_t imm);
void qemu_plugin_register_vcpu_insn_exec_cb(struct qemu_plugin_insn *insn, vcpu_udata_cb_t cb,
                                            enum qemu_plugin_cb_flags flags, void *userdata);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *tb, size_t idx);
uint64_t qemu_plugin_insn_vaddr(const struct qemu_plugin_insn *insn);
void qemu_plugin_outs(const char *string);

EXPORT int qemu_plugin_version = 1;

static uint64_t executed;            /* instructions of every block entered so far */
static uint64_t begin_addr, end_addr, at_begin, intervals;
static int armed;
static char out_path[4096];

/* userdata of a marker callback: block length, index of the marker in its block, which marker */
#define MARK(n, i, is_end) ((void *)(uintptr_t)(((uint64_t)(n) << 32) | ((uint64_t)(i) << 1) | (is_end)))

static void write_count(uint64_t count) {
  char line[64];
  int len = snprintf(line, sizeof line, "%llu %llu\n", (unsigned long long)intervals,
                     (unsigned long long)count);
  int fd = open(out_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) return;
  if (write(fd, line, (size_t)len) != len) qemu_plugin_outs("insn_count: short write\n");
  close(fd);
}

static void on_marker(unsigned int vcpu, void *udata) {
  (void)vcpu;
  uint64_t u = (uint64_t)(uintptr_t)udata;
  uint64_t n = u >> 32, i = (u & 0xFFFFFFFFu) >> 1;
  uint64_t before = executed - n + i;  /* instructions completed before this one */
  if (!(u & 1)) {
    at_begin = before;
    armed = 1;
  } else if (armed) {
    armed = 0;
    intervals++;
    write_count(before - at_begin);
  }
}

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb) {
  (void)id;
  size_t n = qemu_plugin_tb_n_insns(tb);
  qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &executed, n);
  for (size_t i = 0; i < n; i++) {
    struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
    uint64_t a = qemu_plugin_insn_vaddr(insn);
    if (a == begin_addr || a == end_addr)
      qemu_plugin_register_vcpu_insn_exec_cb(insn, on_marker, QEMU_PLUGIN_CB_NO_REGS,
                                             MARK(n, i, a == end_addr));
  }
}

EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv) {
  (void)info;
  for (int k = 0; k < argc; k++) {
    if (!strncmp(argv[k], "begin=", 6)) begin_addr = strtoull(argv[k] + 6, NULL, 0) & ~1ull;
    else if (!strncmp(argv[k], "end=", 4)) end_addr = strtoull(argv[k] + 4, NULL, 0) & ~1ull;
    else if (!strncmp(argv[k], "out=", 4)) snprintf(out_path, sizeof out_path, "%s", argv[k] + 4);
  }
  if (!begin_addr || !end_addr || !out_path[0]) {
    qemu_plugin_outs("insn_count: needs begin=ADDR,end=ADDR,out=FILE\n");
    return -1;
  }
  qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
  return 0;
}
