/* tinyshield instruction counter: a QEMU TCG plugin (plugin API v1, QEMU 7.x).
 *
 * Counts the guest instructions executed from the first instruction of the function at `begin=`
 * to the first instruction of the function at `end=` (the firmware's tsh_mark_begin and
 * tsh_mark_end), and after each such interval rewrites the file `out=` with one line:
 * "<intervals so far> <instructions in the last interval>".
 *
 * With `marks=FILE` (one address per line, in execution order: the tsh_call_<k> labels of the
 * generated tsh_model_run) and `calls=FILE`, each interval is also cut at those addresses, and the
 * file `calls=` is rewritten (before `out=`) with "<intervals>" and then one line per region:
 * begin..mark 0, mark 0..mark 1, ..., last mark..end. The regions partition the interval, so they
 * add up to its count exactly.
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
static char out_path[4096], calls_path[4096];

/* Region marks: sorted addresses for the lookup at translation, and the region each one opens. */
#define MAX_MARKS 65000
static uint64_t *mark_addr;
static uint32_t *mark_region;
static uint64_t *region_count;
static size_t n_marks;
static uint64_t region, region_start;

/* userdata of a marker callback: block length, index in its block, which marker (0 begin, 1 end,
 * 2 + k the k-th region mark) */
#define MARK(n, i, id) ((void *)(uintptr_t)(((uint64_t)(n) << 32) | ((uint64_t)(i) << 16) | (uint64_t)(id)))

static void write_count(uint64_t count) {
  char line[64];
  int len = snprintf(line, sizeof line, "%llu %llu\n", (unsigned long long)intervals,
                     (unsigned long long)count);
  int fd = open(out_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) return;
  if (write(fd, line, (size_t)len) != len) qemu_plugin_outs("insn_count: short write\n");
  close(fd);
}

static void write_regions(void) {
  FILE *f = fopen(calls_path, "w");
  if (!f) return;
  fprintf(f, "%llu\n", (unsigned long long)intervals);
  for (size_t r = 0; r <= n_marks; r++) fprintf(f, "%llu\n", (unsigned long long)region_count[r]);
  fclose(f);
}

static void on_marker(unsigned int vcpu, void *udata) {
  (void)vcpu;
  uint64_t u = (uint64_t)(uintptr_t)udata;
  uint64_t n = u >> 32, i = (u >> 16) & 0xFFFFu, id = u & 0xFFFFu;
  uint64_t before = executed - n + i;  /* instructions completed before this one */
  if (id == 0) {
    at_begin = before;
    armed = 1;
    if (n_marks) {
      memset(region_count, 0, (n_marks + 1) * sizeof *region_count);
      region = 0;
      region_start = before;
    }
  } else if (id == 1) {
    if (!armed) return;
    armed = 0;
    intervals++;
    if (n_marks) {
      region_count[region] += before - region_start;
      write_regions();
    }
    write_count(before - at_begin);
  } else if (armed) {                  /* a region mark: close the open region, open the next */
    region_count[region] += before - region_start;
    region = id - 1;                   /* mark k opens region k + 1 */
    region_start = before;
  }
}

static long find_mark(uint64_t a) {
  size_t lo = 0, hi = n_marks;
  while (lo < hi) {
    size_t mid = (lo + hi) / 2;
    if (mark_addr[mid] < a) lo = mid + 1; else hi = mid;
  }
  return lo < n_marks && mark_addr[lo] == a ? (long)lo : -1;
}

static int cmp_u64(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return x < y ? -1 : x > y;
}

static int load_marks(const char *path) {
  FILE *f = fopen(path, "r");
  if (!f) return -1;
  uint64_t *addr = calloc(MAX_MARKS, sizeof *addr);
  size_t n = 0;
  unsigned long long a;
  while (n < MAX_MARKS && fscanf(f, "%llx", &a) == 1) addr[n++] = (uint64_t)a & ~1ull;
  fclose(f);
  /* Region of mark k is k + 1: keep (address << 16 | k) pairs sorted by address for the lookup. */
  uint64_t *pairs = calloc(n ? n : 1, sizeof *pairs);
  for (size_t k = 0; k < n; k++) pairs[k] = addr[k] << 16 | k;
  qsort(pairs, n, sizeof *pairs, cmp_u64);
  mark_addr = addr;
  mark_region = calloc(n ? n : 1, sizeof *mark_region);
  for (size_t k = 0; k < n; k++) {
    mark_addr[k] = pairs[k] >> 16;
    mark_region[k] = (uint32_t)(pairs[k] & 0xFFFFu) + 1;
  }
  free(pairs);
  n_marks = n;
  region_count = calloc(n + 1, sizeof *region_count);
  return 0;
}

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb) {
  (void)id;
  size_t n = qemu_plugin_tb_n_insns(tb);
  qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &executed, n);
  for (size_t i = 0; i < n; i++) {
    struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
    uint64_t a = qemu_plugin_insn_vaddr(insn);
    if (a == begin_addr || a == end_addr) {
      qemu_plugin_register_vcpu_insn_exec_cb(insn, on_marker, QEMU_PLUGIN_CB_NO_REGS,
                                             MARK(n, i, a == end_addr));
    } else if (n_marks) {
      long k = find_mark(a);
      if (k >= 0)
        qemu_plugin_register_vcpu_insn_exec_cb(insn, on_marker, QEMU_PLUGIN_CB_NO_REGS,
                                               MARK(n, i, 1 + mark_region[k]));
    }
  }
}

EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv) {
  (void)info;
  for (int k = 0; k < argc; k++) {
    if (!strncmp(argv[k], "begin=", 6)) begin_addr = strtoull(argv[k] + 6, NULL, 0) & ~1ull;
    else if (!strncmp(argv[k], "end=", 4)) end_addr = strtoull(argv[k] + 4, NULL, 0) & ~1ull;
    else if (!strncmp(argv[k], "out=", 4)) snprintf(out_path, sizeof out_path, "%s", argv[k] + 4);
    else if (!strncmp(argv[k], "calls=", 6)) snprintf(calls_path, sizeof calls_path, "%s", argv[k] + 6);
    else if (!strncmp(argv[k], "marks=", 6) && load_marks(argv[k] + 6) != 0) {
      qemu_plugin_outs("insn_count: cannot read the marks= file\n");
      return -1;
    }
  }
  if (n_marks && !calls_path[0]) {
    qemu_plugin_outs("insn_count: marks= needs calls=FILE\n");
    return -1;
  }
  if (!begin_addr || !end_addr || !out_path[0]) {
    qemu_plugin_outs("insn_count: needs begin=ADDR,end=ADDR,out=FILE\n");
    return -1;
  }
  qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
  return 0;
}
