/* Checks the CPUID the VMM gives its vCPU: the hypervisor bit, KVM's
 * signature leaf, the boot vCPU's APIC id; then says whether the TSC-deadline
 * timer is listed (leaf 1 ECX bit 24: without it Linux calibrates its local
 * APIC timer at every boot), for the test to compare with the host's KVM. */
#include "guest.h"

static void cpuid(u32 leaf, u32 *a, u32 *b, u32 *c, u32 *d) {
  __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

int main(void) {
  u32 a, b, c, d;
  cpuid(1, &a, &b, &c, &d);
  CHECK(1, c & (1u << 31));
  CHECK(2, (b >> 24) == 0);
  u32 deadline = (c >> 24) & 1;
  cpuid(0x40000000, &a, &b, &c, &d);
  /* "KVMKVMKVM\0\0\0" */
  CHECK(3, b == 0x4b4d564b && c == 0x564b4d56 && d == 0x4d);
  say(deadline ? "tsc-deadline=1\n" : "tsc-deadline=0\n");
  return report(0);
}
