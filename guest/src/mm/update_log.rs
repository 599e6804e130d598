//! The update log the manifest publishes (layout in `hvo_abi::update_log`):
//! every page-table store, written by the mapper's one store function, and
//! every TLB invalidation, written by the architecture's one invalidation
//! function, for the command being served. The host replays it with its own
//! rules; nothing here judges.
//!
//! The firmware keeps it in a static in `.noinit`, which boot does not zero
//! (5 MiB: zeroing them cost x86_64 over a second under TCG): [`init`]
//! writes the whole header, and a record is read only after it was written
//! (the host reads the first `len`). Host tests keep one per test thread.

use hvo_abi::update_log::{InvalidationForm, RawRecord, RawUpdateLog, UPDATE_LOG_CAPACITY, UPDATE_LOG_MAGIC};

use super::{PhysAddr, VirtAddr};

#[cfg(not(test))]
#[link_section = ".noinit.update_log"]
static mut LOG: core::mem::MaybeUninit<RawUpdateLog> = core::mem::MaybeUninit::zeroed();

#[cfg(not(test))]
fn with_log<R>(f: impl FnOnce(&mut RawUpdateLog) -> R) -> R {
    // SAFETY: the firmware is single-threaded and takes no interrupts that
    // touch page tables; the log is integers only, any bytes are valid.
    f(unsafe { (*core::ptr::addr_of_mut!(LOG)).assume_init_mut() })
}

#[cfg(test)]
std::thread_local! {
    static LOG: std::cell::RefCell<Box<RawUpdateLog>> = std::cell::RefCell::new(zeroed_log());
}

#[cfg(test)]
fn zeroed_log() -> Box<RawUpdateLog> {
    let log = Box::<RawUpdateLog>::new_zeroed();
    // SAFETY: all-zero bytes are a valid RawUpdateLog (integers only).
    let mut log = unsafe { log.assume_init() };
    log.magic = UPDATE_LOG_MAGIC;
    log.capacity = UPDATE_LOG_CAPACITY as u64;
    log
}

#[cfg(test)]
fn with_log<R>(f: impl FnOnce(&mut RawUpdateLog) -> R) -> R {
    LOG.with_borrow_mut(|log| f(log))
}

/// Writes the whole header (the log is not zeroed at boot): called once,
/// before the first page-table store.
pub fn init() {
    with_log(|log| {
        log.magic = UPDATE_LOG_MAGIC;
        log.capacity = UPDATE_LOG_CAPACITY as u64;
        log.command = 0;
        log.len = 0;
        log.total = 0;
    });
}

/// Where the log is, for the manifest.
#[cfg(not(test))]
pub fn address() -> u64 {
    core::ptr::addr_of!(LOG) as u64
}

/// Starts a command: the log holds its updates from now on.
pub fn begin_command() {
    with_log(|log| {
        log.command += 1;
        log.len = 0;
    });
}

/// Appends `record`, or merges it into the last one when it continues a run
/// of stores; past the capacity only counts it.
fn append(log: &mut RawUpdateLog, record: RawRecord, merge: impl Fn(&mut RawRecord) -> bool) -> Option<()> {
    let capacity = log.capacity.min(UPDATE_LOG_CAPACITY as u64);
    let kept = log.len.min(capacity) as usize;
    if log.len > 0 && log.len <= capacity {
        let last = log.records.get_mut(kept - 1)?;
        if merge(last) {
            return Some(());
        }
    }
    if log.len < capacity {
        *log.records.get_mut(kept)? = record;
    }
    log.len += 1;
    log.total += 1;
    Some(())
}

/// One page-table store: the entry at `entry` went from `old` to `new`.
pub fn record_store(entry: PhysAddr, old: u64, new: u64) {
    with_log(|log| {
        append(log, RawRecord::stores(entry.0, old, new, 1, 0), |last| {
            let fits = last.extends(entry.0, old, new);
            if fits {
                last.extend(new);
            }
            fits
        })
    });
}

/// One invalidation instruction with its operands as executed, and what the
/// code meant it to invalidate.
pub fn record_invalidation(form: InvalidationForm, operand: u64, second: u64, meant: VirtAddr, meant_bytes: u64) {
    with_log(|log| append(log, RawRecord::invalidation(form, operand, second, meant.0, meant_bytes), |_| false));
}

/// The current command's records, for host tests.
#[cfg(test)]
pub fn current() -> (u64, Vec<RawRecord>) {
    with_log(|log| {
        let kept = log.len.min(log.capacity) as usize;
        (log.len, log.records[..kept].to_vec())
    })
}

/// Shrinks the log, so a test can overflow it.
#[cfg(test)]
pub fn set_capacity(capacity: u64) {
    with_log(|log| log.capacity = capacity);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_to_consecutive_entries_are_one_run() {
        begin_command();
        for i in 0..4 {
            record_store(PhysAddr(0x1000 + 8 * i), 0, 0x8000_0000 + 0x1000 * i);
        }
        record_store(PhysAddr(0x2000), 7, 0);
        let (len, records) = current();
        assert_eq!(len, 2);
        assert_eq!(records[0], RawRecord::stores(0x1000, 0, 0x8000_0000, 4, 0x1000));
        assert_eq!(records[1], RawRecord::stores(0x2000, 7, 0, 1, 0));
    }

    #[test]
    fn an_invalidation_ends_a_run_and_a_new_command_starts_empty() {
        begin_command();
        record_store(PhysAddr(0x1000), 0, 1);
        record_invalidation(InvalidationForm::X86Invlpg, 0x5000, 0, VirtAddr(0x5000), 4096);
        record_store(PhysAddr(0x1008), 0, 1);
        assert_eq!(current().0, 3);
        begin_command();
        assert_eq!(current(), (0, Vec::new()));
    }

    #[test]
    fn past_the_capacity_records_are_counted_not_kept() {
        set_capacity(2);
        begin_command();
        for i in 0..5 {
            record_invalidation(InvalidationForm::X86Invlpg, i, 0, VirtAddr(i), 4096);
        }
        let (len, records) = current();
        assert_eq!((len, records.len()), (5, 2));
        set_capacity(UPDATE_LOG_CAPACITY as u64);
    }
}
