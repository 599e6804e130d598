//! Console output (`print!`/`println!`) and the line reader commands arrive on.

use core::fmt;

use hvo_abi::protocol::MAX_LINE;

use crate::arch;

pub struct Console;

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        arch::console_write(s.as_bytes());
        Ok(())
    }
}

#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = write!($crate::console::Console, $($arg)*);
    }};
}

#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!($crate::console::Console, $($arg)*);
    }};
}

/// Why a line could not be delivered.
pub enum LineError {
    /// Longer than the protocol allows; the rest of it up to the newline was dropped.
    TooLong,
    /// Not UTF-8 (garbage on the line).
    NotText,
}

/// Assembles console bytes into lines without blocking.
pub struct LineReader {
    buf: [u8; MAX_LINE],
    len: usize,
    overflowed: bool,
}

impl LineReader {
    pub const fn new() -> LineReader {
        LineReader { buf: [0; MAX_LINE], len: 0, overflowed: false }
    }

    /// Feeds every byte the console has; returns a complete line when one ends.
    /// The caller must consume the line before polling again.
    pub fn poll(&mut self) -> Option<Result<&str, LineError>> {
        while let Some(byte) = arch::console_read() {
            match byte {
                b'\n' | b'\r' => {
                    if self.overflowed {
                        self.overflowed = false;
                        self.len = 0;
                        return Some(Err(LineError::TooLong));
                    }
                    if self.len == 0 {
                        continue;
                    }
                    let len = core::mem::replace(&mut self.len, 0);
                    return Some(core::str::from_utf8(&self.buf[..len]).map_err(|_| LineError::NotText));
                }
                _ if self.len == MAX_LINE => self.overflowed = true,
                _ => {
                    self.buf[self.len] = byte;
                    self.len += 1;
                }
            }
        }
        None
    }
}
