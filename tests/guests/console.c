/* A virtio-console (multiport) driver for the test guests: the control
 * handshake hyperinit's kernel does, then text on the two named ports, which
 * hyperboot must put on its stdout and stderr. MODE 1 adds hostile control
 * messages and transmit buffers first; the honest writes must still arrive.
 * MODE 2 (hyperboot -i) also opens the stdin port and echoes everything that
 * arrives on it to stdout until COM2 says `stdin-eof N` and N bytes came.
 * MODEs 3 and 4 write BULK_KB KiB on the stdout port or the serial console
 * (scripts/bench-boot's throughput figures).
 * Polls the used rings (no interrupts). */
#include "guest.h"

#define BASE 0xd0001000u
#define QSZ 8
#define F_NEXT 1
#define F_WRITE 2
#define S_ACK 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#if MODE == 2
#define NQ 10
#define PORTS 3
#else
#define NQ 8
#define PORTS 2
#endif
#define RXQ 8
#define RXBUF(i) (0x380000u + (i) * 0x1000u)
/* Per queue: descriptors, available ring, used ring, 4 KiB each; buffers after. */
#define QMEM(q) (0x300000u + (q) * 0x3000u)
#define BUF(q, i) (0x340000u + (q) * 0x1000u + (i) * 0x200u)

struct desc { u32 addr_lo, addr_hi, len; u16 flags, next; };
#define D(q) ((volatile struct desc *)QMEM(q))
#define AVAIL_IDX(q) (*(volatile u16 *)(QMEM(q) + 0x1000 + 2))
#define AVAIL_RING(q, i) (*(volatile u16 *)(QMEM(q) + 0x1000 + 4 + 2 * (i)))
#define USED_IDX(q) (*(volatile u16 *)(QMEM(q) + 0x2000 + 2))
#define USED_ID(q, i) (*(volatile u32 *)(QMEM(q) + 0x2000 + 4 + 8 * (i)))
#define USED_LEN(q, i) (*(volatile u32 *)(QMEM(q) + 0x2000 + 8 + 8 * (i)))

static u16 avail[NQ], seen[NQ];

static void zero(u32 addr, u32 len) { for (u32 i = 0; i < len; i += 4) mmio_w32(addr + i, 0); }

static int dev_init(void) {
  CHECK(1, mmio_r32(BASE) == 0x74726976);
  CHECK(2, mmio_r32(BASE + 8) == 3);               /* console */
  mmio_w32(BASE + 0x70, 0);
  mmio_w32(BASE + 0x70, S_ACK | S_DRIVER);
  mmio_w32(BASE + 0x14, 0);
  CHECK(3, mmio_r32(BASE + 0x10) & 2);             /* MULTIPORT */
  CHECK(4, mmio_r32(BASE + 0x104) == PORTS + 1);   /* port 0, stdout, stderr (, stdin) */
  mmio_w32(BASE + 0x24, 0); mmio_w32(BASE + 0x20, 2);
  mmio_w32(BASE + 0x24, 1); mmio_w32(BASE + 0x20, 1);
  mmio_w32(BASE + 0x70, S_ACK | S_DRIVER | S_FEATURES_OK);
  CHECK(5, mmio_r32(BASE + 0x70) & S_FEATURES_OK);
  for (u32 q = 0; q < NQ; q++) {
    zero(QMEM(q), 0x3000);
    avail[q] = seen[q] = 0;
    mmio_w32(BASE + 0x30, q);
    CHECK(6, mmio_r32(BASE + 0x34) >= QSZ);
    mmio_w32(BASE + 0x38, QSZ);
    mmio_w32(BASE + 0x80, QMEM(q)); mmio_w32(BASE + 0x84, 0);
    mmio_w32(BASE + 0x90, QMEM(q) + 0x1000); mmio_w32(BASE + 0x94, 0);
    mmio_w32(BASE + 0xa0, QMEM(q) + 0x2000); mmio_w32(BASE + 0xa4, 0);
    mmio_w32(BASE + 0x44, 1);
  }
  mmio_w32(BASE + 0x70, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
  return 0;
}

/* Offers descriptor `i` of queue q (one buffer) and notifies. */
static void offer(u32 q, int i, u32 addr, u32 len, u16 flags) {
  D(q)[i].addr_lo = addr; D(q)[i].addr_hi = 0; D(q)[i].len = len; D(q)[i].flags = flags; D(q)[i].next = 0;
  AVAIL_RING(q, avail[q] % QSZ) = (u16)i;
  barrier();
  avail[q]++;
  AVAIL_IDX(q) = avail[q];
  barrier();
  mmio_w32(BASE + 0x50, q);
  mmio_w32(BASE + 0x64, mmio_r32(BASE + 0x60));
}

/* Sends one control message (id, event, value) on the control transmit queue. */
static void control(u32 id, u16 event, u16 value) {
  u32 b = BUF(3, avail[3] % QSZ);
  mmio_w32(b, id);
  mmio_w32(b + 4, (u32)event | ((u32)value << 16));
  offer(3, avail[3] % QSZ, b, 8, 0);
}

/* Posts the control receive buffers. */
static void post_rx(void) {
  for (int i = 0; i < QSZ; i++) { zero(BUF(2, i), 0x200); offer(2, i, BUF(2, i), 0x200, F_WRITE); }
}

/* The next control message from the device, or 0 when none came within
 * about `cycles` TSC cycles. */
static u32 next_msg(u64 cycles) {
  WAIT_CYCLES(USED_IDX(2) != seen[2], cycles);
  if (USED_IDX(2) == seen[2]) return 0;
  u32 i = USED_ID(2, seen[2] % QSZ);
  seen[2]++;
  return BUF(2, i);
}

static void text(u32 port, const char *s) {
  u32 q = 2 * port + 3, b = BUF(q, 0), n = 0;
  while (s[n]) { mmio_w8(b + n, (u8)s[n]); n++; }
  offer(q, avail[q] % QSZ, b, n, 0);
}

int main(void) {
  int r;
  if ((r = dev_init())) return r;
  post_rx();
#if MODE == 1 /* hostile: unknown events and ports, a short message, a writable tx buffer */
  control(7, 3, 1);                    /* PORT_READY for a port that does not exist */
  control(1, 99, 0);                   /* unknown event */
  offer(3, 5, BUF(3, 5), 4, 0);        /* a control message of 4 bytes */
  offer(5, 1, BUF(5, 1), 16, F_WRITE); /* stdout: a buffer the device may only write */
  offer(5, 2, 0x7ffff000u, 64, 0);     /* stdout: a buffer outside guest memory */
  WAIT_FOR(USED_IDX(3) == avail[3] && USED_IDX(5) == avail[5]);
  CHECK(20, mmio_r32(BASE + 0x70) == (S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK));
  CHECK(21, next_msg(2000000000ull) == 0); /* no answer to any of it */
#endif
  control(0, 0, 1);                    /* DEVICE_READY */
  u32 added = 0, named = 0, opened = 0;
  for (int guard = 0; guard < 64 && opened < PORTS; guard++) {
    u32 m = next_msg(20000000000ull);
    if (!m) break;
    u32 id = mmio_r32(m);
    u32 ev = mmio_r32(m + 4) & 0xffff;
#ifdef DEBUG
    say("msg "); put_num(0x3f8, id); say(" "); put_num(0x3f8, ev); say("\n");
#endif
    if (ev == 1) { added++; control(id, 3, 1); }            /* DEVICE_ADD -> PORT_READY */
    else if (ev == 7) {                                      /* PORT_NAME */
      const char *want = id == 1 ? "hyper.stdout" : id == 2 ? "hyper.stderr" : "hyper.stdin";
      for (u32 k = 0; want[k]; k++) CHECK(10, *(volatile u8 *)(m + 8 + k) == (u8)want[k]);
      named++;
    } else if (ev == 6) opened++;                           /* PORT_OPEN */
    zero(m, 0x200);                                          /* give the buffer back */
    offer(2, (int)((m - BUF(2, 0)) / 0x200), m, 0x200, F_WRITE);
  }
  if (!(added == PORTS && named == PORTS && opened == PORTS)) {
    say("handshake: added "); put_num(0x3f8, added); say(" named "); put_num(0x3f8, named);
    say(" opened "); put_num(0x3f8, opened); say("\n");
  }
  CHECK(11, added == PORTS && named == PORTS && opened == PORTS);
  text(1, "to stdout over virtio\n");
  WAIT_FOR(USED_IDX(5) == avail[5]);
  CHECK(12, USED_IDX(5) == avail[5]);
  text(2, "to stderr over virtio\n");
  WAIT_FOR(USED_IDX(7) == avail[7]);
  CHECK(13, USED_IDX(7) == avail[7]);
#if MODE == 2
  /* Open the stdin port, post its receive buffers, say ready on COM2 (the
   * host holds its requests until then), then echo. */
  control(3, 6, 1);
  for (int i = 0; i < QSZ; i++) offer(RXQ, i, RXBUF(i), 0x1000, F_WRITE);
  put(0x2f8, "ready\n");
  u32 got = 0, eof = 0xffffffffu, num = 0;
  char line[32]; u32 ll = 0;
  for (u32 spins = 0; spins < 400000000u && got < eof; spins++) {
    while (inb(0x2f8 + 5) & 1) {                   /* a byte on COM2 */
      char ch = (char)inb(0x2f8);
      if (ch != '\n') { if (ll < sizeof line - 1) line[ll++] = ch; continue; }
      line[ll] = 0;
      const char *k = "stdin-eof ";
      u32 j = 0;
      while (k[j] && line[j] == k[j]) j++;
      if (!k[j]) { num = 0; for (; line[j] >= '0' && line[j] <= '9'; j++) num = num * 10 + (u32)(line[j] - '0'); eof = num; }
      ll = 0;
    }
    while (USED_IDX(RXQ) != seen[RXQ]) {
      u32 i = USED_ID(RXQ, seen[RXQ] % QSZ), n = USED_LEN(RXQ, seen[RXQ] % QSZ);
      seen[RXQ]++;
      CHECK(30, i < QSZ && n <= 0x1000);
      if (n) { offer(5, avail[5] % QSZ, RXBUF(i), n, 0); WAIT_FOR(USED_IDX(5) == avail[5]); CHECK(31, USED_IDX(5) == avail[5]); }
      got += n;
      offer(RXQ, (int)i, RXBUF(i), 0x1000, F_WRITE);
    }
  }
  CHECK(32, got == eof);
  say("console: echoed ");
  put_num(0x3f8, got);
  say(" bytes\n");
#elif MODE == 3 /* throughput: BULK_KB KiB on the stdout port in 64 KiB buffers */
  for (u32 i = 0; i < 65536; i += 4) mmio_w32(0x400000u + i, 0x41414141u);
  for (u32 kb = 0; kb < BULK_KB; kb += 64) {
    offer(5, avail[5] % QSZ, 0x400000u, 65536, 0);
    WAIT_FOR(USED_IDX(5) == avail[5]);
    CHECK(40, USED_IDX(5) == avail[5]);
  }
#elif MODE == 4 /* throughput: BULK_KB KiB on the serial console, a byte per exit */
  for (u32 n = 0; n < BULK_KB * 1024u; n++) outb(0x3f8, 'A');
#else
  say("console: both ports written\n");
#endif
  return report(0);
}
