/* A virtio-blk driver for the test guests, and the hostile things a guest can
 * do to the device. MODE selects the scenario; every mode ends with an honest
 * read that must still work, proving the VMM went on.
 *
 * The rootfs the tests attach holds, at every 4-byte aligned offset o, the
 * little-endian word o ^ 0x5a5a5a5a. */
#include "guest.h"

#define BASE 0xd0000000u
#define DESC 0x200000u
#define AVAIL 0x201000u
#define USED 0x202000u
#define HDR 0x203000u
#define DATA 0x204000u
#define STATUS 0x206000u
#define QSZ 8
#define F_NEXT 1
#define F_WRITE 2
#define S_ACK 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define S_NEEDS_RESET 0x40

struct desc { u32 addr_lo, addr_hi, len; u16 flags, next; };
#define D ((volatile struct desc *)DESC)
#define AVAIL_IDX (*(volatile u16 *)(AVAIL + 2))
#define AVAIL_RING(i) (*(volatile u16 *)(AVAIL + 4 + 2 * (i)))
#define USED_IDX (*(volatile u16 *)(USED + 2))
#define USED_LEN(i) (*(volatile u32 *)(USED + 4 + 8 * (i) + 4))

static u16 next_avail;
static u32 capacity;

static void zero(u32 addr, u32 len) { for (u32 i = 0; i < len; i += 4) mmio_w32(addr + i, 0); }

static int dev_init(void) {
  CHECK(1, mmio_r32(BASE) == 0x74726976);
  CHECK(2, mmio_r32(BASE + 4) == 2);
  CHECK(3, mmio_r32(BASE + 8) == 2);
  mmio_w32(BASE + 0x70, 0);
  zero(DESC, 0x3000);
  next_avail = 0;
  mmio_w32(BASE + 0x70, S_ACK);
  mmio_w32(BASE + 0x70, S_ACK | S_DRIVER);
  mmio_w32(BASE + 0x14, 1);
  CHECK(4, mmio_r32(BASE + 0x10) & 1); /* VIRTIO_F_VERSION_1 */
  mmio_w32(BASE + 0x24, 0);
  mmio_w32(BASE + 0x20, 0);
  mmio_w32(BASE + 0x24, 1);
  mmio_w32(BASE + 0x20, 1);
  mmio_w32(BASE + 0x70, S_ACK | S_DRIVER | S_FEATURES_OK);
  CHECK(5, mmio_r32(BASE + 0x70) & S_FEATURES_OK);
  mmio_w32(BASE + 0x30, 0);
  CHECK(6, mmio_r32(BASE + 0x34) >= QSZ);
  mmio_w32(BASE + 0x38, QSZ);
  mmio_w32(BASE + 0x80, DESC); mmio_w32(BASE + 0x84, 0);
  mmio_w32(BASE + 0x90, AVAIL); mmio_w32(BASE + 0x94, 0);
  mmio_w32(BASE + 0xa0, USED); mmio_w32(BASE + 0xa4, 0);
  mmio_w32(BASE + 0x44, 1);
  mmio_w32(BASE + 0x70, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
  capacity = mmio_r32(BASE + 0x100);
  CHECK(7, mmio_r32(BASE + 0x104) == 0 && capacity >= 16);
  return 0;
}

/* Publishes the chain starting at descriptor 0; returns the used length, or
 * -1 when the device did not return the chain. */
static int submit(void) {
  u16 before = USED_IDX;
  AVAIL_RING(next_avail % QSZ) = 0;
  barrier();
  next_avail++;
  AVAIL_IDX = next_avail;
  barrier();
  mmio_w32(BASE + 0x50, 0);
  WAIT_FOR(USED_IDX != before || (mmio_r32(BASE + 0x70) & S_NEEDS_RESET));
  mmio_w32(BASE + 0x64, mmio_r32(BASE + 0x60));
  if (USED_IDX != (u16)(before + 1)) return -1;
  return (int)USED_LEN(before % QSZ);
}

static void set_desc(int i, u32 addr, u32 len, u16 flags, u16 next) {
  D[i].addr_lo = addr; D[i].addr_hi = 0; D[i].len = len; D[i].flags = flags; D[i].next = next;
}

/* A three-descriptor request: header, data, status. Returns the status byte
 * (0xee when the device did not write it); *used gets the used length. */
static u8 request(u32 type, u32 sector, u32 data, u32 len, u16 data_flags, int *used) {
  mmio_w32(HDR, type); mmio_w32(HDR + 4, 0); mmio_w32(HDR + 8, sector); mmio_w32(HDR + 12, 0);
  set_desc(0, HDR, 16, F_NEXT, 1);
  set_desc(1, data, len, (u16)(F_NEXT | data_flags), 2);
  set_desc(2, STATUS, 1, F_WRITE, 0);
  mmio_w8(STATUS, 0xee);
  *used = submit();
  return *(volatile u8 *)STATUS;
}

/* Whether the 512 bytes at buf hold sector `sector` of the pattern. */
static int check_sector(u32 sector, u32 buf) {
  for (u32 o = 0; o < 512; o += 4) {
    u32 off = sector * 512 + o;
    if (mmio_r32(buf + o) != (off ^ 0x5a5a5a5au)) return 0;
  }
  return 1;
}

/* The honest read every mode ends with. */
static int honest_read(int n) {
  int used;
  zero(DATA, 1024);
  CHECK(90, request(0, 3, DATA, 1024, F_WRITE, &used) == 0);
  CHECK(91, used == 1025);
  CHECK(92, check_sector(3, DATA) && check_sector(4, DATA + 512));
  (void)n;
  return 0;
}

int main(void) {
  int used, r;
  (void)used;
  if ((r = dev_init())) return r;
#if MODE == 0 /* well-behaved: reads, a refused write, flush, id, out of range */
  zero(DATA, 4096);
  CHECK(10, request(0, 0, DATA, 4096, F_WRITE, &used) == 0);
  CHECK(11, used == 4097);
  for (u32 s = 0; s < 8; s++) CHECK(12, check_sector(s, DATA + s * 512));
  CHECK(13, request(0, capacity - 1, DATA, 512, F_WRITE, &used) == 0);
  for (u32 o = 0; o < 512; o += 4) CHECK(14, mmio_r32(DATA + o) == (((capacity - 1) * 512 + o) ^ 0x5a5a5a5au));
  CHECK(15, request(1, 0, DATA, 512, 0, &used) == 1);          /* write: I/O error */
  CHECK(16, request(4, 0, DATA, 0, 0, &used) == 0);            /* flush */
  CHECK(17, request(8, 0, DATA, 20, F_WRITE, &used) == 0);     /* get id */
  CHECK(18, *(volatile u8 *)DATA == 'h');
  CHECK(19, request(0, capacity, DATA, 512, F_WRITE, &used) == 1); /* past the end */
  CHECK(20, request(0, capacity - 1, DATA, 1024, F_WRITE, &used) == 1);
  CHECK(21, request(99, 0, DATA, 512, F_WRITE, &used) == 2);   /* unsupported */
  CHECK(22, request(0, 0, DATA, 512, 0, &used) == 1);          /* read into a read-only buffer */
  say("virtio-blk: reads verified, write refused\n");
#elif MODE == 1 /* queue placed outside guest memory */
  mmio_w32(BASE + 0x70, 0);
  mmio_w32(BASE + 0x70, S_ACK | S_DRIVER | S_FEATURES_OK);
  mmio_w32(BASE + 0x30, 0);
  mmio_w32(BASE + 0x38, QSZ);
  mmio_w32(BASE + 0x80, 0xf0000000u); mmio_w32(BASE + 0x84, 0x7fff);
  mmio_w32(BASE + 0x90, AVAIL); mmio_w32(BASE + 0xa0, USED);
  mmio_w32(BASE + 0x44, 1);
  mmio_w32(BASE + 0x70, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
  mmio_w32(BASE + 0x50, 0);
  WAIT_FOR(mmio_r32(BASE + 0x70) & S_NEEDS_RESET);
  CHECK(30, mmio_r32(BASE + 0x70) & S_NEEDS_RESET);
  if ((r = dev_init())) return r;
#elif MODE == 2 /* data buffer outside guest memory */
  CHECK(40, request(0, 0, 0x7ffff000u, 4096, F_WRITE, &used) == 1);
#elif MODE == 3 /* a loop in the descriptor chain */
  set_desc(0, HDR, 16, F_NEXT, 1);
  set_desc(1, DATA, 512, F_NEXT | F_WRITE, 0);
  r = submit();
  CHECK(50, r == 0 || r == -1);
  if (r == -1) { if ((r = dev_init())) return r; }
#elif MODE == 4 /* absurd lengths */
  CHECK(60, request(0, 0, DATA, 0xfffff000u, F_WRITE, &used) == 1);
  CHECK(61, request(0, 0xffffffffu, DATA, 512, F_WRITE, &used) == 1);
#elif MODE == 5 /* unknown registers, odd widths, MMIO where nothing is */
  CHECK(70, mmio_r32(BASE + 0x0f0) == 0);
  CHECK(71, mmio_r32(BASE + 0x800) == 0);
  mmio_w32(BASE + 0x0c0, 0xdeadbeef);
  mmio_w8(BASE + 0x070, 0xff);
  mmio_w32(BASE + 0xffc, 0xdeadbeef);
  CHECK(72, mmio_r32(0xe0000000u) == 0);
  mmio_w32(0xe0000000u, 1);
  mmio_w32(BASE + 0x30, 77);               /* select a queue that does not exist */
  CHECK(73, mmio_r32(BASE + 0x34) == 0);
  mmio_w32(BASE + 0x50, 77);               /* and notify it */
  mmio_w32(BASE + 0x30, 0);
  CHECK(74, mmio_r32(BASE + 0x70) == (S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK));
#elif MODE == 6 /* the available index jumps far ahead */
  AVAIL_IDX = (u16)(next_avail + 1000);
  mmio_w32(BASE + 0x50, 0);
  WAIT_CYCLES(mmio_r32(BASE + 0x70) & S_NEEDS_RESET, 2000000000ull);
  if ((r = dev_init())) return r;
#elif MODE == 7 /* status descriptor the device may not write */
  set_desc(0, HDR, 16, F_NEXT, 1);
  set_desc(1, DATA, 512, F_NEXT | F_WRITE, 2);
  set_desc(2, STATUS, 1, 0, 0);
  mmio_w8(STATUS, 0xee);
  CHECK(80, submit() == 0);
  CHECK(81, *(volatile u8 *)STATUS == 0xee);
#endif
  if ((r = honest_read(MODE))) return r;
  say("virtio-blk: device still serves after mode ");
  put_num(0x3f8, MODE);
  say("\n");
  return report(0);
}
