//! Our QMP client: the `qapi` crate behind a small type of our own, so the crate
//! can be replaced and its caveats (QEMU-FACTS.md) are handled in one place:
//! every command has a timeout, the handshake runs in its own task (it can
//! panic when QEMU dies during start-up), events are drained continuously
//! (the event stream also carries command replies), and every command and
//! reply is kept in a transcript for the run's artifacts.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use qapi::futures::{QapiService, QmpStreamTokio};
use qapi::qmp;
use tokio::io::WriteHalf;
use tokio::net::UnixStream;
use tokio::sync::Notify;

use crate::addr::{PhysAddr, VirtAddr};

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP handshake did not finish within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("QMP handshake failed: {0}")]
    Handshake(String),
    #[error("QMP command {command} got no reply within {timeout:?}")]
    Timeout { command: &'static str, timeout: Duration },
    #[error("QMP command {command} failed: {message}")]
    Command { command: &'static str, message: String },
    #[error("QMP connection lost during {command}: {message}")]
    Disconnected { command: &'static str, message: String },
    #[error("{command}: {message}")]
    BadReply { command: &'static str, message: String },
    #[error("reading the pmemsave output failed: {0}")]
    Io(#[from] std::io::Error),
}

type Service = QapiService<QmpStreamTokio<WriteHalf<UnixStream>>>;

#[derive(Default)]
struct EventLog {
    events: Vec<qmp::Event>,
    closed: bool,
}

/// The transcript of a QMP session: one line per command, reply and event.
#[derive(Clone, Default)]
pub struct Transcript {
    lines: Arc<Mutex<Vec<String>>>,
    start: Option<Instant>,
    /// Also print every line on standard error as it comes (`xtask repro`).
    echo: Arc<std::sync::atomic::AtomicBool>,
}

impl Transcript {
    fn push(&self, line: String) {
        let t = self.start.map(|s| s.elapsed().as_secs_f64()).unwrap_or(0.0);
        let line = format!("[{t:9.4}] qmp {line}");
        if self.echo.load(std::sync::atomic::Ordering::Relaxed) {
            eprintln!("{line}");
        }
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
    }

    /// Prints the lines so far on standard error, and every later one as it comes.
    pub fn echo(&self) {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        for l in lines.iter() {
            eprintln!("{l}");
        }
        self.echo.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn text(&self) -> String {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        lines.iter().map(|l| format!("{l}\n")).collect()
    }
}

pub struct Qmp {
    service: Service,
    events: Arc<(Mutex<EventLog>, Notify)>,
    transcript: Transcript,
    /// Default time limit for one command.
    pub timeout: Duration,
}

impl Qmp {
    /// Negotiates QMP on a connection QEMU made to us.
    pub async fn handshake(stream: UnixStream, timeout: Duration, start: Instant) -> Result<Qmp, QmpError> {
        let task = tokio::spawn(async move {
            let negotiation = QmpStreamTokio::open(stream).await?;
            negotiation.negotiate().await
        });
        let stream = match tokio::time::timeout(timeout, task).await {
            Err(_) => return Err(QmpError::HandshakeTimeout(timeout)),
            Ok(Err(join)) => return Err(QmpError::Handshake(format!("QMP client panicked: {join}"))),
            Ok(Ok(Err(io))) => return Err(QmpError::Handshake(io.to_string())),
            Ok(Ok(Ok(stream))) => stream,
        };
        let (service, mut event_stream) = stream.into_parts();
        let transcript = Transcript { lines: Default::default(), start: Some(start), echo: Default::default() };
        let events: Arc<(Mutex<EventLog>, Notify)> = Default::default();
        {
            let events = events.clone();
            let transcript = transcript.clone();
            tokio::spawn(async move {
                while let Some(item) = event_stream.next().await {
                    match item {
                        Ok(event) => {
                            transcript.push(format!("<- event {event:?}"));
                            events.0.lock().unwrap_or_else(|e| e.into_inner()).events.push(event);
                        }
                        Err(e) => {
                            transcript.push(format!("<- stream error: {e}"));
                            break;
                        }
                    }
                    events.1.notify_waiters();
                }
                events.0.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
                events.1.notify_waiters();
            });
        }
        Ok(Qmp { service, events, transcript, timeout })
    }

    pub fn transcript(&self) -> &Transcript {
        &self.transcript
    }

    /// Runs one command with the default time limit.
    pub async fn execute<C>(&self, command: C) -> Result<C::Ok, QmpError>
    where
        C: qmp::QmpCommand + std::fmt::Debug + 'static,
        C::Ok: std::fmt::Debug,
    {
        self.execute_within(command, self.timeout).await
    }

    pub async fn execute_within<C>(&self, command: C, timeout: Duration) -> Result<C::Ok, QmpError>
    where
        C: qmp::QmpCommand + std::fmt::Debug + 'static,
        C::Ok: std::fmt::Debug,
    {
        let name = C::NAME;
        self.transcript.push(format!("-> {command:?}"));
        let reply = tokio::time::timeout(timeout, self.service.execute(command)).await;
        match reply {
            Err(_) => {
                self.transcript.push(format!("<- {name}: no reply within {timeout:?}"));
                Err(QmpError::Timeout { command: name, timeout })
            }
            Ok(Ok(ok)) => {
                self.transcript.push(format!("<- {name}: {ok:?}"));
                Ok(ok)
            }
            Ok(Err(qapi::ExecuteError::Qapi(e))) => {
                self.transcript.push(format!("<- {name}: error {}", e.desc));
                Err(QmpError::Command { command: name, message: e.desc })
            }
            Ok(Err(e)) => {
                self.transcript.push(format!("<- {name}: {e}"));
                Err(QmpError::Disconnected { command: name, message: e.to_string() })
            }
        }
    }

    /// A human-monitor command (for what QMP has no command for, like gva2gpa).
    pub async fn hmp(&self, command_line: &str) -> Result<String, QmpError> {
        self.execute(qmp::human_monitor_command { command_line: command_line.to_string(), cpu_index: None }).await
    }

    /// QEMU's own translation of a guest-virtual address through the current
    /// CPU state; `None` when QEMU says it is unmapped.
    pub async fn gva2gpa(&self, va: VirtAddr) -> Result<Option<PhysAddr>, QmpError> {
        let out = self.hmp(&format!("gva2gpa {:#x}", va.0)).await?;
        let out = out.trim();
        if out.contains("Unmapped") {
            return Ok(None);
        }
        out.strip_prefix("gpa: ")
            .and_then(|hex| u64::from_str_radix(hex.trim_start_matches("0x"), 16).ok())
            .map(|pa| Some(PhysAddr(pa)))
            .ok_or_else(|| QmpError::BadReply { command: "gva2gpa", message: format!("unexpected reply {out:?}") })
    }

    /// Reads guest-physical memory through QEMU (`pmemsave` into `scratch`,
    /// then the file): works with any memory backend.
    pub async fn pmemsave(&self, pa: PhysAddr, len: usize, scratch: &Path) -> Result<Vec<u8>, QmpError> {
        self.execute(qmp::pmemsave { val: pa.0, size: len as u64, filename: scratch.display().to_string() }).await?;
        let bytes = tokio::fs::read(scratch).await?;
        let _ = tokio::fs::remove_file(scratch).await;
        if bytes.len() != len {
            return Err(QmpError::BadReply {
                command: "pmemsave",
                message: format!("wrote {} bytes, asked for {len}", bytes.len()),
            });
        }
        Ok(bytes)
    }

    /// Waits until an event matching `want` has arrived (at any time since the
    /// handshake) or the connection closes or `timeout` passes.
    pub async fn wait_event(&self, want: impl Fn(&qmp::Event) -> bool, timeout: Duration) -> Option<qmp::Event> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.events.1.notified();
            {
                let log = self.events.0.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(e) = log.events.iter().find(|e| want(e)) {
                    return Some(e.clone());
                }
                if log.closed {
                    return None;
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }
}
