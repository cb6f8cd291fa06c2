/* Never stops: only --timeout ends it. */
#include "guest.h"
int main(void) { say("spinning\n"); for (;;) barrier(); }
