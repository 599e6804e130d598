//! Entry from QEMU's pseries loader (VOF): the CPU starts at the image's first
//! byte big-endian, 32-bit, real mode. The first two words read as "branch
//! over the next word" big-endian and as a harmless trap-never plus a branch
//! little-endian; the big-endian path runs a few byte-swapped instructions that
//! set MSR[LE] with rfid. Both paths then meet in little-endian code, which
//! turns on 64-bit mode and FP/VMX/VSX (Rust uses them), points r2 at the TOC,
//! zeroes .bss, sets the stack and calls `ppc64_entry`.

core::arch::global_asm!(
    r#"
    .macro HVO_LOAD64 reg, sym
    lis \reg, \sym@highest
    ori \reg, \reg, \sym@higher
    rldicr \reg, \reg, 32, 31
    oris \reg, \reg, \sym@h
    ori \reg, \reg, \sym@l
    .endm

    .section .text.boot, "ax"
    .global _start
_start:
    tdi 0, 0, 0x48                      /* big-endian: b .+8 */
    b hvo_little_endian
    /* Big-endian instructions, written byte by byte. */
    .byte 0x7d, 0x60, 0x00, 0xa6        /* mfmsr r11 */
    .byte 0x69, 0x6b, 0x00, 0x01        /* xori r11, r11, 1 (MSR[LE]) */
    .byte 0x42, 0x9f, 0x00, 0x05        /* bcl 20, 31, .+4 */
    .byte 0x7d, 0x48, 0x02, 0xa6        /* mflr r10: address of this word */
    .byte 0x39, 0x4a, 0x00, 0x14        /* addi r10, r10, 20: hvo_little_endian */
    .byte 0x7d, 0x5a, 0x03, 0xa6        /* mtsrr0 r10 */
    .byte 0x7d, 0x7b, 0x03, 0xa6        /* mtsrr1 r11 */
    .byte 0x4c, 0x00, 0x00, 0x24        /* rfid */
hvo_little_endian:
    mfmsr %r11
    li %r12, 1
    rldicr %r12, %r12, 63, 0            /* MSR[SF] */
    oris %r12, %r12, 0x0280             /* MSR[VEC] | MSR[VSX] */
    ori %r12, %r12, 0x2000              /* MSR[FP] */
    or %r11, %r11, %r12
    mtmsrd %r11
    isync
    HVO_LOAD64 %r2, .TOC.
    HVO_LOAD64 %r3, __bss_start
    HVO_LOAD64 %r4, __bss_end
    li %r0, 0
1:  cmpld %r3, %r4
    bge 2f
    std %r0, 0(%r3)
    addi %r3, %r3, 8
    b 1b
2:  HVO_LOAD64 %r1, hvo_boot_stack_top
    addi %r1, %r1, -32
    std %r0, 0(%r1)
    bl ppc64_entry
3:  b 3b

    .section .bss.boot, "aw", @nobits
    .balign 16
hvo_boot_stack:
    .space 0x10000
hvo_boot_stack_top:
"#
);
