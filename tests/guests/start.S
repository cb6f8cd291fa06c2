/* Entry of every test guest: the PVH note (so hyperboot boots it like a
 * vmlinux), a stack, main(), then main's return value on the exit port. */
.section .note.Xen, "a", @note
.align 4
.long 4, 4, 18          /* namesz, descsz, XEN_ELFNOTE_PHYS32_ENTRY */
.asciz "Xen"
.long _start

.text
.code32
.globl _start
_start:
#ifdef NULL_GUEST
  mov $0x501, %dx       /* the null guest: leave on the first instructions */
  out %al, (%dx)
#endif
  mov $0x80000, %esp
  call main
  mov $0x501, %dx
  out %al, (%dx)
1: hlt
  jmp 1b
