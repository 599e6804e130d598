//! Real Linux kernels as guests: the initramfs the harness writes for them
//! (busybox-static and an agent that speaks the console line protocol) and
//! the kernel symbols the host needs to find the kernel's page tables and
//! vmemmap from outside.

pub mod agent;
pub mod initramfs;
pub mod symbols;
pub mod verify;

#[cfg(test)]
mod test_elf;
