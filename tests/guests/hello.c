/* Prints a line on the console and reports exit code 42. */
#include "guest.h"
int main(void) { say("hello from a test guest\n"); return report(42); }
