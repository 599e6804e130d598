//! PVH entry: QEMU (through qboot) starts us in 32-bit protected mode with
//! paging off and EBX pointing at `hvm_start_info`. The trampoline zeroes .bss,
//! identity-maps the first 4 GiB with 1 GiB pages, enters long mode with
//! CR0.WP (so kernel writes to read-only pages fault) and EFER.NXE, and calls
//! `x86_64_entry` on the boot stack.

core::arch::global_asm!(
    r#"
    .section .note.Xen, "a", @note
    .balign 4
    .long 4                 /* name size: "Xen\0" */
    .long 4                 /* descriptor size */
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .long hvo_pvh_start32
    .balign 4

    .section .text.boot, "ax"
    .code32
    .global hvo_pvh_start32
hvo_pvh_start32:
    cli
    cld
    mov esi, ebx
    mov edi, offset __bss_start
    mov ecx, offset __bss_end
    sub ecx, edi
    xor eax, eax
    rep stosb

    mov eax, offset hvo_boot_pdpt
    or eax, 0x3
    mov dword ptr [hvo_boot_pml4], eax
    mov dword ptr [hvo_boot_pdpt + 0], 0x00000083
    mov dword ptr [hvo_boot_pdpt + 8], 0x40000083
    mov dword ptr [hvo_boot_pdpt + 16], 0x80000083
    mov dword ptr [hvo_boot_pdpt + 24], 0xc0000083
    mov eax, offset hvo_boot_pml4
    mov cr3, eax

    mov eax, cr4
    or eax, 1 << 5                      /* PAE */
    mov cr4, eax
    mov ecx, 0xc0000080                 /* EFER */
    rdmsr
    or eax, (1 << 8) | (1 << 11)        /* LME | NXE */
    wrmsr
    mov eax, cr0
    or eax, (1 << 31) | (1 << 16) | 1   /* PG | WP | PE */
    mov cr0, eax

    lgdt [hvo_boot_gdt_ptr]
    mov eax, offset hvo_long_mode
    push 0x08
    push eax
    retf

    .code64
hvo_long_mode:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax
    lea rsp, [rip + hvo_boot_stack_top]
    mov edi, esi
    call x86_64_entry
    ud2

    .section .rodata.boot, "a"
    .balign 16
hvo_boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff            /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff            /* 0x10: data */
hvo_boot_gdt_ptr:
    .word hvo_boot_gdt_ptr - hvo_boot_gdt - 1
    .long hvo_boot_gdt

    .section .bss.boot, "aw", @nobits
    .balign 4096
hvo_boot_pml4:
    .space 4096
hvo_boot_pdpt:
    .space 4096
    .balign 16
hvo_boot_stack:
    .space 0x10000
hvo_boot_stack_top:
"#
);
