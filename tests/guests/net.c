/* A virtio-net driver for the test guests: posts receive buffers, asks by
 * ARP who has the user-mode gateway 10.0.2.2 (the guest being 10.0.2.15),
 * and waits for the answer, which passt gives through hyperboot's device.
 * MODE 1 first sends frames the device must refuse (too short, a buffer it
 * may only write, one outside guest memory) and posts a receive buffer too
 * small for any frame; the honest exchange must still work. Polls the used
 * rings (no interrupts). MODE 2 then waits for a TCP SYN to port 80: a
 * connection to a port published with -p, through hyperboot's relay and
 * passt. MODE 3 (--net tap) learns the host's address from a datagram and
 * asks for it by ARP; the host's kernel answers. */
#include "guest.h"

#define BASE 0xd0002000u
#define QSZ 8
#define F_WRITE 2
#define S_ACK 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define QMEM(q) (0x300000u + (q) * 0x3000u)
#define RXBUF(i) (0x340000u + (i) * 0x1000u)
#define TXBUF 0x350000u

struct desc { u32 addr_lo, addr_hi, len; u16 flags, next; };
#define D(q) ((volatile struct desc *)QMEM(q))
#define AVAIL_IDX(q) (*(volatile u16 *)(QMEM(q) + 0x1000 + 2))
#define AVAIL_RING(q, i) (*(volatile u16 *)(QMEM(q) + 0x1000 + 4 + 2 * (i)))
#define USED_IDX(q) (*(volatile u16 *)(QMEM(q) + 0x2000 + 2))
#define USED_ID(q, i) (*(volatile u32 *)(QMEM(q) + 0x2000 + 4 + 8 * (i)))
#define USED_LEN(q, i) (*(volatile u32 *)(QMEM(q) + 0x2000 + 8 + 8 * (i)))

static u16 avail[2], seen[2];

static void zero(u32 addr, u32 len) { for (u32 i = 0; i < len; i += 4) mmio_w32(addr + i, 0); }
static u8 rd8(u32 a) { return *(volatile u8 *)a; }

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

static const u8 mac[6] = {0x52, 0x54, 0x00, 0x12, 0x34, 0x56};

/* An ARP request for 10.0.2.2 from 10.0.2.15 at TXBUF, behind the 12-byte header. */
static u32 arp_request(void) {
  u32 b = TXBUF;
  zero(b, 0x100);
  u32 o = b + 12;
  for (int i = 0; i < 6; i++) { mmio_w8(o + i, 0xff); mmio_w8(o + 6 + i, mac[i]); }
  mmio_w8(o + 12, 0x08); mmio_w8(o + 13, 0x06);
  const u8 arp[8] = {0, 1, 8, 0, 6, 4, 0, 1};
  for (int i = 0; i < 8; i++) mmio_w8(o + 14 + i, arp[i]);
  for (int i = 0; i < 6; i++) mmio_w8(o + 22 + i, mac[i]);
  mmio_w8(o + 28, 10); mmio_w8(o + 29, 0); mmio_w8(o + 30, 2); mmio_w8(o + 31, 15);
  mmio_w8(o + 38, 10); mmio_w8(o + 39, 0); mmio_w8(o + 40, 2); mmio_w8(o + 41, 2);
  return 12 + 42;
}

int main(void) {
  CHECK(1, mmio_r32(BASE) == 0x74726976);
  CHECK(2, mmio_r32(BASE + 8) == 1);               /* network card */
  mmio_w32(BASE + 0x70, 0);
  mmio_w32(BASE + 0x70, S_ACK | S_DRIVER);
  mmio_w32(BASE + 0x14, 0);
  CHECK(3, mmio_r32(BASE + 0x10) & (1u << 5));     /* MAC */
  CHECK(4, rd8(BASE + 0x100) == 0x52 && rd8(BASE + 0x105) == 0x56);
  mmio_w32(BASE + 0x24, 0); mmio_w32(BASE + 0x20, 1u << 5);
  mmio_w32(BASE + 0x24, 1); mmio_w32(BASE + 0x20, 1);
  mmio_w32(BASE + 0x70, S_ACK | S_DRIVER | S_FEATURES_OK);
  CHECK(5, mmio_r32(BASE + 0x70) & S_FEATURES_OK);
  for (u32 q = 0; q < 2; q++) {
    zero(QMEM(q), 0x3000);
    mmio_w32(BASE + 0x30, q);
    CHECK(6, mmio_r32(BASE + 0x34) >= QSZ);
    mmio_w32(BASE + 0x38, QSZ);
    mmio_w32(BASE + 0x80, QMEM(q)); mmio_w32(BASE + 0x84, 0);
    mmio_w32(BASE + 0x90, QMEM(q) + 0x1000); mmio_w32(BASE + 0x94, 0);
    mmio_w32(BASE + 0xa0, QMEM(q) + 0x2000); mmio_w32(BASE + 0xa4, 0);
    mmio_w32(BASE + 0x44, 1);
  }
  mmio_w32(BASE + 0x70, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
#if MODE == 1
  offer(0, 7, RXBUF(7), 16, F_WRITE);              /* too small for any frame: dropped into */
  offer(1, 1, TXBUF, 4, 0);                        /* shorter than the header */
  offer(1, 2, TXBUF, 64, F_WRITE);                 /* a buffer the device may only write */
  offer(1, 3, 0x7ffff000u, 64, 0);                 /* outside guest memory */
  WAIT_FOR(USED_IDX(1) == avail[1]);
  CHECK(20, USED_IDX(1) == avail[1]);              /* all returned, none sent */
  CHECK(21, mmio_r32(BASE + 0x70) == (S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK));
#endif
  for (int i = 0; i < 7; i++) offer(0, i, RXBUF(i), 0x1000, F_WRITE);
#if MODE == 3
  /* --net tap: the host's address is learnt from a UDP datagram the test
   * sends to the tap's broadcast address; then the host is asked by ARP. */
  say("net: listening\n");
  u32 host = 0;
  for (u32 spins = 0; spins < 2000000000u; spins++) {
    if (spins % 1024 == 0) (void)inb(0x80);
    while (USED_IDX(0) != seen[0]) {
      u32 i = USED_ID(0, seen[0] % QSZ), n = USED_LEN(0, seen[0] % QSZ);
      seen[0]++;
      if (i >= QSZ) continue;
      u32 f = RXBUF(i) + 12;
      if (n >= 12 + 42 && rd8(f + 12) == 0x08 && rd8(f + 13) == 0x00 && rd8(f + 14 + 9) == 17 && !host) {
        for (int k = 0; k < 4; k++) host = (host << 8) | rd8(f + 14 + 12 + k);
        u32 me = host + 1;
        u32 o = arp_request() ? TXBUF + 12 : 0;
        for (int k = 0; k < 4; k++) {
          mmio_w8(o + 28 + k, (u8)(me >> (24 - 8 * k)));
          mmio_w8(o + 38 + k, (u8)(host >> (24 - 8 * k)));
        }
        offer(1, 0, TXBUF, 12 + 42, 0);
        WAIT_FOR(USED_IDX(1) == avail[1]);
        CHECK(30, USED_IDX(1) == avail[1]);
      } else if (host && n >= 12 + 42 && rd8(f + 12) == 0x08 && rd8(f + 13) == 0x06 && rd8(f + 21) == 2) {
        u32 sender = 0;
        for (int k = 0; k < 4; k++) sender = (sender << 8) | rd8(f + 28 + k);
        if (sender == host) {
          say("net: tap host ");
          for (int k = 0; k < 4; k++) { put_num(0x3f8, (host >> (24 - 8 * k)) & 255); if (k < 3) say("."); }
          say(" answered\n");
          return report(0);
        }
      }
      offer(0, (int)i, RXBUF(i), 0x1000, F_WRITE);
    }
  }
  return report(13);
#endif
  /* Ask, and ask again now and then, as a network stack does (a reply that
   * met the too-small buffer of MODE 1 was dropped). */
  for (u32 spins = 0; spins < 200000000u; spins++) {
    /* Leave the guest now and then: on a nested host a vCPU that never exits
     * can keep passt and hyperboot's receive thread off the CPU. */
    if (spins % 1024 == 0) (void)inb(0x80);
    if (spins % 200000u == 0) {
      offer(1, 0, TXBUF, arp_request(), 0);
      WAIT_FOR(USED_IDX(1) == avail[1]);
      CHECK(10, USED_IDX(1) == avail[1]);
    }
    while (USED_IDX(0) != seen[0]) {
      u32 i = USED_ID(0, seen[0] % QSZ), n = USED_LEN(0, seen[0] % QSZ);
      seen[0]++;
      if (i == 7) { CHECK(22, n == 0); continue; }  /* the small buffer got nothing */
      if (i >= QSZ || n < 12 + 42) continue;
      u32 f = RXBUF(i) + 12;
      if (rd8(f + 12) == 0x08 && rd8(f + 13) == 0x06 && rd8(f + 21) == 2 &&
          rd8(f + 28) == 10 && rd8(f + 29) == 0 && rd8(f + 30) == 2 && rd8(f + 31) == 2) {
        say("net: 10.0.2.2 is-at ");
        for (int k = 0; k < 6; k++) {
          const char *hex = "0123456789abcdef";
          char h[3] = {hex[rd8(f + 22 + k) >> 4], hex[rd8(f + 22 + k) & 15], 0};
          say(h);
          if (k < 5) say(":");
        }
        say("\n");
#if MODE == 2
        goto syn;
#else
        return report(0);
#endif
      }
      offer(0, (int)i, RXBUF(i), 0x1000, F_WRITE);   /* not it: the buffer goes back */
    }
  }
  say("net: no ARP reply\n");
  return report(11);
#if MODE == 2
  /* A connection to a published port: hyperboot's relay -> passt -> a TCP
   * SYN for 10.0.2.15:80 in a received frame. */
syn:
  for (u32 spins = 0; spins < 2000000000u; spins++) {
    /* Leave the guest now and then: on a nested host a vCPU that never exits
     * can keep passt and hyperboot's receive thread off the CPU. */
    if (spins % 1024 == 0) (void)inb(0x80);
    while (USED_IDX(0) != seen[0]) {
      u32 i = USED_ID(0, seen[0] % QSZ), n = USED_LEN(0, seen[0] % QSZ);
      seen[0]++;
      if (i >= QSZ) continue;
      u32 f = RXBUF(i) + 12, ip = f + 14;
      if (n >= 12 + 14 + 20 + 20 && rd8(f + 12) == 0x08 && rd8(f + 13) == 0x00 && rd8(ip + 9) == 6) {
        u32 tcp = ip + (rd8(ip) & 15) * 4;
        u32 dport = ((u32)rd8(tcp + 2) << 8) | rd8(tcp + 3);
        if (dport == 80 && (rd8(tcp + 13) & 0x02)) {
          say("net: SYN for 10.0.2.15:80\n");
          return report(0);
        }
      }
      offer(0, (int)i, RXBUF(i), 0x1000, F_WRITE);
    }
  }
  say("net: no SYN\n");
  return report(12);
#endif
}
