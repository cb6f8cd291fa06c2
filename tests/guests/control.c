/* Waits for a request from the host on COM2 (what hyperinit listens to),
 * echoes it on the console and reports exit 0 — or exit 1 if none comes.
 * Like hyperinit, it says `ready` on COM2 first: the host holds requests
 * until then. */
#include "guest.h"

#define COM2 0x2f8

int main(void) {
  char line[64];
  u32 n = 0;
  say("waiting for a request\n");
  put(COM2, "ready\n");
  for (u32 spins = 0; spins < 2000000000u; spins++) {
    if (!(inb(COM2 + 5) & 1)) continue; /* no data ready */
    char c = (char)inb(COM2);
    if (c == '\n') break;
    if (n < sizeof(line) - 1) line[n++] = c;
  }
  line[n] = 0;
  if (n == 0) return report(1);
  say("got: ");
  say(line);
  say("\n");
  return report(0);
}
