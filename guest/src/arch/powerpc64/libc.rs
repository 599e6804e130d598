//! What the powerpc64le-unknown-linux-gnu `core` expects from a C library.
//! Byte-wise volatile loops, so the compiler cannot turn them back into calls
//! to themselves.

#[no_mangle]
unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    for i in 0..n {
        dest.add(i).write_volatile(src.add(i).read_volatile());
    }
    dest
}

#[no_mangle]
unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize) < (src as usize) {
        for i in 0..n {
            dest.add(i).write_volatile(src.add(i).read_volatile());
        }
    } else {
        for i in (0..n).rev() {
            dest.add(i).write_volatile(src.add(i).read_volatile());
        }
    }
    dest
}

#[no_mangle]
unsafe extern "C" fn memset(dest: *mut u8, value: i32, n: usize) -> *mut u8 {
    // Whole doublewords where aligned: page-table frames are zeroed through here.
    let mut i = 0;
    if (dest as usize).is_multiple_of(8) && value == 0 {
        while i + 8 <= n {
            dest.add(i).cast::<u64>().write_volatile(0);
            i += 8;
        }
    }
    while i < n {
        dest.add(i).write_volatile(value as u8);
        i += 1;
    }
    dest
}

#[no_mangle]
unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        let (x, y) = (a.add(i).read_volatile(), b.add(i).read_volatile());
        if x != y {
            return x as i32 - y as i32;
        }
    }
    0
}

#[no_mangle]
unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    memcmp(a, b, n)
}

/// The linux-gnu `core` is built for unwinding; panics abort here, so the
/// personality routine is never called.
#[no_mangle]
extern "C" fn rust_eh_personality() {}
