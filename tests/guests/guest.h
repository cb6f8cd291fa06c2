/* Freestanding helpers for the tiny test guests: 32-bit protected mode,
 * paging off, no interrupts; port I/O to the console (COM1), the status
 * channel (COM2) and the exit port; MMIO by physical address. */
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline void mmio_w32(u32 addr, u32 v) { *(volatile u32 *)addr = v; }
static inline u32 mmio_r32(u32 addr) { return *(volatile u32 *)addr; }
static inline void mmio_w8(u32 addr, u8 v) { *(volatile u8 *)addr = v; }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }
static inline u64 rdtsc(void) { u32 lo, hi; __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi)); return ((u64)hi << 32) | lo; }

/* The VMM serves queue notifications on a thread of its own, as a real
 * device does: after a notify, a driver waits for the used ring. Spins until
 * `cond` holds or about `cycles` TSC cycles passed (a few seconds for
 * WAIT_FOR: a device that never answers fails the check that follows). */
#define WAIT_CYCLES(cond, cycles) do { u64 _t0 = rdtsc(); while (!(cond) && rdtsc() - _t0 < (cycles)) barrier(); } while (0)
#define WAIT_FOR(cond) WAIT_CYCLES(cond, 20000000000ull)

static inline void put(u16 port, const char *s) { while (*s) outb(port, (u8)*s++); }
static inline void put_num(u16 port, u32 n) {
  char b[11]; int i = 10; b[i] = 0;
  do { b[--i] = (char)('0' + n % 10); n /= 10; } while (n);
  put(port, b + i);
}
static inline void say(const char *s) { put(0x3f8, s); }

/* Reports exit=N on the status channel; main's return value then goes to the exit port. */
static inline int report(u32 code) { put(0x2f8, "exit="); put_num(0x2f8, code); put(0x2f8, "\n"); return (int)code; }

/* A failed check: says which on the console and reports its number. */
#define CHECK(n, cond) do { if (!(cond)) { say("check " #n " failed: " #cond "\n"); return report(n); } } while (0)
