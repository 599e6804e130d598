//! Serves the host's commands (protocol in `hvo_abi::protocol`).

use hvo_abi::protocol::{parse_request, write_reply_head, Command, Marker};

use crate::console::{Console, LineError, LineReader};
use crate::mm::frames::FrameAllocator;
use crate::mm::update_log;
use crate::mm::{Pfn, PhysAddr, VirtAddr};
use crate::paging::Table;
use crate::vmemmap::{DaxRequest, Mm, VmemmapError};
use crate::{arch, manifest, Kernel};

/// Empty console polls (a device access each, about a microsecond under
/// TCG) before the guest halts to wait for the host.
const SPIN_POLLS: u32 = 300;

/// Answers commands until told to exit.
pub fn serve(kernel: &mut Kernel) -> ! {
    let mut reader = LineReader::new();
    let mut idle_polls = 0;
    loop {
        let polled = reader.poll();
        idle_polls = if polled.is_some() { 0 } else { idle_polls + 1 };
        match polled {
            // Spinning answers a quick next request (and the rest of a line)
            // soonest, but holds a host CPU and QEMU's I/O lock the whole time
            // the host works out its next request, which the runs in parallel
            // pay for: after a short spin the guest halts instead.
            None if idle_polls < SPIN_POLLS => core::hint::spin_loop(),
            None => {
                arch::wait_for_console();
                idle_polls = 0;
            }
            Some(Err(LineError::TooLong)) => reply_err(None, format_args!("command too long")),
            Some(Err(LineError::NotText)) => reply_err(None, format_args!("command is not text")),
            Some(Ok(line)) => match parse_request(line) {
                Err((seq, error)) => reply_err(seq, format_args!("{error}")),
                Ok(req) => match start(req.command) {
                    Command::Ping { token } => reply_ok(
                        req.seq,
                        format_args!("pong{}{}", if token.is_some() { " " } else { "" }, token.unwrap_or("")),
                    ),
                    Command::Report => {
                        let generation = manifest::publish(kernel);
                        reply_ok(req.seq, format_args!("generation={generation}"))
                    }
                    Command::HugetlbAlloc { order, count, zone, from } => {
                        let from = from.map(|r| r as usize);
                        let done = kernel.vmemmap.hugetlb_alloc(&mut kernel.frames, order, count, zone, from);
                        changed(kernel, req.seq, done.map(|id| id as u64), "region")
                    }
                    Command::HugetlbFree { region } => {
                        let k = &mut *kernel;
                        let done =
                            k.vmemmap.hugetlb_free(&mut mm(&mut k.tables.kernel, &mut k.frames), region as usize);
                        changed(kernel, req.seq, done.map(|()| u64::from(region)), "freed")
                    }
                    Command::Optimize { region, layout } => {
                        let k = &mut *kernel;
                        let mut mm = mm(&mut k.tables.kernel, &mut k.frames);
                        let done = k.vmemmap.optimize(&mut mm, region as usize, layout);
                        changed(kernel, req.seq, done.map(|()| u64::from(region)), "optimized")
                    }
                    Command::ReserveGigantic { order, count, zone } => {
                        let done = kernel.vmemmap.reserve_gigantic(&mut kernel.frames, order, count, zone);
                        changed(kernel, req.seq, done.map(|id| id as u64), "region")
                    }
                    Command::BootMemmap => {
                        let done = boot_memmap(kernel);
                        changed(kernel, req.seq, done.map(|()| kernel.vmemmap.struct_pages_initialized), "initialized")
                    }
                    Command::ReservePmem { size } => {
                        let k = &mut *kernel;
                        let done = k.vmemmap.reserve_pmem(&mut k.frames, &mut k.ram, size);
                        changed(kernel, req.seq, done.map(|pa| pa.0), "pmem")
                    }
                    Command::HotAdd { start, size, order, zone, layout, altmap } => {
                        let k = &mut *kernel;
                        let request = DaxRequest { start: PhysAddr(start), size, order, zone, layout, altmap };
                        let done = k.vmemmap.hot_add(&mut mm(&mut k.tables.kernel, &mut k.frames), request);
                        if done.is_ok() {
                            sync_process_root_over(k, start, size);
                        }
                        changed(kernel, req.seq, done.map(|id| id as u64), "region")
                    }
                    Command::HotAddMemory { start, size, zone } => {
                        let k = &mut *kernel;
                        let mut mm = mm(&mut k.tables.kernel, &mut k.frames);
                        let done = k.vmemmap.hot_add_memory(&mut mm, PhysAddr(start), size, zone);
                        if done.is_ok() {
                            sync_process_root_over(k, start, size);
                        }
                        changed(kernel, req.seq, done.map(|id| id as u64), "region")
                    }
                    Command::HotRemove { region, slot } => {
                        let k = &mut *kernel;
                        let done = k.vmemmap.hot_remove(&mut mm(&mut k.tables.kernel, &mut k.frames), region as usize);
                        if let (Ok(()), Some(slot)) = (done, slot) {
                            arch::eject_memory_slot(slot);
                        }
                        changed(kernel, req.seq, done.map(|()| u64::from(region)), "removed")
                    }
                    Command::FailAlloc { nth } => {
                        kernel.frames.fail_nth(nth);
                        reply_ok(req.seq, format_args!("armed={nth}"))
                    }
                    Command::Knob { knob } => {
                        kernel.vmemmap.knobs |= knob.bit();
                        if knob == hvo_abi::model::Knob::CounterNotDecremented {
                            kernel.frames.forget_vmemmap_frees = true;
                        }
                        changed(kernel, req.seq, Ok(knob.bit()), "knobs")
                    }
                    Command::Restore { region } => {
                        let k = &mut *kernel;
                        let done = k.vmemmap.restore(&mut mm(&mut k.tables.kernel, &mut k.frames), region as usize);
                        changed(kernel, req.seq, done.map(|()| u64::from(region)), "restored")
                    }
                    Command::ProbeRead { va, marker } => match probe_read(kernel, VirtAddr(va), marker) {
                        Ok(Some(word)) => reply_ok(req.seq, format_args!("read={word:#x}")),
                        Ok(None) => reply_ok(req.seq, format_args!("faulted")),
                        Err(why) => reply_err(Some(req.seq), format_args!("{why}")),
                    },
                    Command::ProbeWrite { va } => {
                        let outcome = if arch::probe_write(VirtAddr(va)) { "faulted" } else { "written" };
                        reply_ok(req.seq, format_args!("{outcome}"))
                    }
                    Command::Panic => panic!("the host asked for a panic"),
                    Command::Exit { status } => {
                        reply_ok(req.seq, format_args!("exiting"));
                        arch::exit(status)
                    }
                },
            },
        }
    }
}

/// A read probe: the host's marker written into its frame, the word at `va`
/// read through whatever translation the TLB holds (`None`: it faulted),
/// and the frame's word put back, so the probe leaves memory as it found
/// it. A read through a stale translation sees the old frame, not the
/// marker. The marker goes through the identity map, as every frame the
/// firmware touches does: a write through the linear map would load a
/// large-page translation in the kernel half, and QEMU's TCG then treats
/// every later page invalidation near it (the vmemmap's) as a full flush,
/// which would hide the stale translations the probe is for.
fn probe_read(kernel: &Kernel, va: VirtAddr, marker: Option<Marker>) -> Result<Option<u64>, &'static str> {
    let Some(Marker { pa, value }) = marker else {
        return Ok(arch::probe_read(va));
    };
    if !pa.is_multiple_of(8) || !kernel.ram.iter().any(|r| r.contains(pa) && r.contains(pa + 7)) {
        return Err("the marker's address is not a word of the guest's RAM");
    }
    let word = PhysAddr(pa).as_mut_ptr::<u64>();
    // SAFETY: all RAM is identity-mapped; the word is restored below, and
    // nothing else runs meanwhile.
    let kept = unsafe {
        let kept = word.read_volatile();
        word.write_volatile(value);
        kept
    };
    let read = arch::probe_read(va);
    // SAFETY: as above.
    unsafe { word.write_volatile(kept) };
    Ok(read)
}

/// Starts a command: the update log holds its page-table stores and TLB
/// invalidations from here on, for the host to replay after the reply.
fn start(command: Command) -> Command {
    update_log::begin_command();
    command
}

/// Populates the boot vmemmap, runs memmap init, and copies the new
/// top-level vmemmap entries into the process root (sync_global_pgds).
fn boot_memmap(kernel: &mut Kernel) -> Result<(), VmemmapError> {
    kernel.vmemmap.populate_boot(&mut mm(&mut kernel.tables.kernel, &mut kernel.frames), &kernel.ram)?;
    kernel.vmemmap.memmap_init(&kernel.ram);
    let (start, end) = kernel.vmemmap.range(&kernel.ram);
    sync_process_root(kernel, start, end);
    Ok(())
}

/// What vmemmap changes work on.
fn mm<'a>(table: &'a mut Table, frames: &'a mut FrameAllocator) -> Mm<'a> {
    Mm { table, frames }
}

/// `sync_process_root` over the vmemmap of the hot-added `[start, start + size)`
/// (knob `unsynced-root-hot-add`: not on this path).
fn sync_process_root_over(kernel: &mut Kernel, start: u64, size: u64) {
    if kernel.vmemmap.knobs & hvo_abi::model::Knob::UnsyncedRootHotAdd.bit() != 0 {
        return;
    }
    let pfn = |pa: u64| Pfn::containing(PhysAddr(pa), arch::BASE_PAGE);
    let (first, end) = (kernel.vmemmap.va(pfn(start)), kernel.vmemmap.va(pfn(start + size)));
    sync_process_root(kernel, first, end);
}

/// Copies the kernel root's new top-level entries over the vmemmap `[first,
/// end)` into the process root, as sync_global_pgds does: every root must
/// see new vmemmap (knob `unsynced-root`: they stay in the kernel root only).
fn sync_process_root(kernel: &mut Kernel, first: VirtAddr, end: VirtAddr) {
    if kernel.vmemmap.knobs & hvo_abi::model::Knob::UnsyncedRoot.bit() == 0 {
        kernel.process.copy_top_level(&kernel.tables.kernel, first, end);
    }
}

/// Republishes the manifest after a change (also after a failed one, whose
/// partial effects the host must see) and answers `ok <what>=<value>`.
fn changed(kernel: &Kernel, seq: u64, done: Result<u64, VmemmapError>, what: &str) {
    let generation = manifest::publish(kernel);
    match done {
        Ok(value) => reply_ok(seq, format_args!("{what}={value} generation={generation}")),
        Err(e) => refuse(seq, e),
    }
}

/// Answers a refused command with its typed reason, then the error itself.
fn refuse(seq: u64, error: VmemmapError) {
    use core::fmt::Write;
    let _ = write_reply_head(&mut Console, Some(seq), false);
    let _ = Console.write_str(" ");
    let _ = error.refusal().write_payload(&mut Console, format_args!("{error:?}"));
    let _ = Console.write_str("\n");
}

fn reply_ok(seq: u64, payload: core::fmt::Arguments) {
    use core::fmt::Write;
    let _ = write_reply_head(&mut Console, Some(seq), true);
    let _ = writeln!(Console, " {payload}");
}

fn reply_err(seq: Option<u64>, message: core::fmt::Arguments) {
    use core::fmt::Write;
    let _ = write_reply_head(&mut Console, seq, false);
    let _ = writeln!(Console, " {message}");
}
