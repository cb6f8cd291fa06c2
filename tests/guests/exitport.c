/* Writes no status line: the exit port's byte (7) is the exit code. */
#include "guest.h"
int main(void) { return 7; }
