//! Our QMP client: the `qapi` crate behind a small type of our own, so the crate
//! can be replaced and its caveats are handled in one place:
//! every command has a timeout, the handshake runs in its own task (it can
//! panic when QEMU dies during start-up), events are drained continuously
//! (the event stream also carries command replies), and every command and
//! reply is kept in a transcript for the run's artifacts. Events the crate's
//! schema does not know are logged and skipped ([`known_messages`]).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use qapi::futures::{QapiService, QmpStreamTokio};
use qapi::qmp;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
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
    /// Without out-of-band support every command goes out with the same id,
    /// so a second one while a reply is owed would be taken for the first
    /// (the `qapi` crate panics on it).
    #[error("QMP command {command} not sent: {earlier} is still unanswered")]
    Unanswered { command: &'static str, earlier: &'static str },
    #[error("QMP command {command} failed: {message}")]
    Command { command: &'static str, message: String },
    #[error("QMP connection lost during {command}: {message}")]
    Disconnected { command: &'static str, message: String },
    #[error("{command}: {message}")]
    BadReply { command: &'static str, message: String },
    #[error("reading the pmemsave output failed: {0}")]
    Io(#[from] std::io::Error),
}

type Service = QapiService<QmpStreamTokio<OwnedWriteHalf>>;

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
    /// A command sent whose reply QEMU still owes.
    unanswered: Mutex<Option<&'static str>>,
    /// Default time limit for one command.
    pub timeout: Duration,
}

impl Qmp {
    /// Negotiates QMP on a connection QEMU made to us.
    pub async fn handshake(stream: UnixStream, timeout: Duration, start: Instant) -> Result<Qmp, QmpError> {
        let transcript = Transcript { lines: Default::default(), start: Some(start), echo: Default::default() };
        let (read, write) = stream.into_split();
        let read = known_messages(read, transcript.clone());
        let task = tokio::spawn(async move {
            let negotiation = QmpStreamTokio::open_split(read, write).await?;
            negotiation.negotiate().await
        });
        let stream = match tokio::time::timeout(timeout, task).await {
            Err(_) => return Err(QmpError::HandshakeTimeout(timeout)),
            Ok(Err(join)) => return Err(QmpError::Handshake(format!("QMP client panicked: {join}"))),
            Ok(Ok(Err(io))) => return Err(QmpError::Handshake(io.to_string())),
            Ok(Ok(Ok(stream))) => stream,
        };
        let (service, mut event_stream) = stream.into_parts();
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
        Ok(Qmp { service, events, transcript, unanswered: Mutex::new(None), timeout })
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
        {
            // Owed from now until its reply: if this future is dropped (a
            // timeout here or a caller's deadline), the reply stays owed.
            let mut owed = self.unanswered.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(earlier) = *owed {
                return Err(QmpError::Unanswered { command: name, earlier });
            }
            *owed = Some(name);
        }
        self.transcript.push(format!("-> {command:?}"));
        let reply = tokio::time::timeout(timeout, self.service.execute(command)).await;
        if reply.is_ok() {
            *self.unanswered.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
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

/// QEMU's QMP output with the events the `qapi` crate cannot decode taken
/// out and logged in the transcript. The crate's line decoder ends the whole
/// stream at the first line it cannot decode, and QEMU sends events its
/// schema does not know (newer QEMU, or ones it never listed).
fn known_messages(read: OwnedReadHalf, transcript: Transcript) -> DuplexStream {
    let (mut forward, filtered) = tokio::io::duplex(64 << 10);
    tokio::spawn(async move {
        let mut read = BufReader::new(read);
        let mut line = Vec::new();
        loop {
            line.clear();
            match read.read_until(b'\n', &mut line).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if let Some(name) = undecodable_event(&line) {
                let text = String::from_utf8_lossy(&line);
                transcript.push(format!("<- event {name} skipped (not in the QMP schema): {}", text.trim_end()));
                continue;
            }
            if forward.write_all(&line).await.is_err() {
                break;
            }
        }
    });
    filtered
}

/// The event's name when `line` is a QMP event that `qapi` cannot decode.
fn undecodable_event(line: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct AnyEvent {
        event: String,
    }
    let event: AnyEvent = serde_json::from_slice(line).ok()?;
    serde_json::from_slice::<qmp::Event>(line).is_err().then_some(event.event)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncBufReadExt;
    use tokio::net::UnixListener;

    type PeerLines = tokio::io::Lines<BufReader<OwnedReadHalf>>;

    /// Accepts the client and does QEMU's side of the handshake: greeting,
    /// then the answer to `qmp_capabilities` (returned with the command).
    async fn greet(listener: UnixListener) -> std::io::Result<(PeerLines, OwnedWriteHalf, Vec<String>)> {
        let (stream, _) = listener.accept().await?;
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        write
            .write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 7}, \"package\": \"\"}, \"capabilities\": []}}\n")
            .await?;
        let received = lines.next_line().await?.into_iter().collect();
        write.write_all(b"{\"return\": {}}\n").await?;
        Ok((lines, write, received))
    }

    /// A QMP peer speaking like QEMU: the handshake, then an event no schema
    /// knows, then answers to the client's next commands.
    async fn fake_qemu(listener: UnixListener) -> std::io::Result<Vec<String>> {
        let (mut lines, mut write, mut received) = greet(listener).await?;
        write
            .write_all(b"{\"event\": \"HVO_NO_SUCH_EVENT\", \"data\": {\"x\": 1}, \"timestamp\": {\"seconds\": 1, \"microseconds\": 2}}\n")
            .await?;
        received.extend(lines.next_line().await?);
        write
            .write_all(b"{\"return\": {\"qemu\": {\"major\": 7, \"minor\": 2, \"micro\": 0}, \"package\": \"\"}}\n")
            .await?;
        write.write_all(b"{\"event\": \"STOP\", \"timestamp\": {\"seconds\": 1, \"microseconds\": 3}}\n").await?;
        received.extend(lines.next_line().await?);
        write.write_all(b"{\"return\": {}}\n").await?;
        Ok(received)
    }

    /// A client connected to `peer` listening in a fresh directory (kept
    /// alive by the returned guard), and the peer's task.
    async fn connect<F>(
        peer: impl FnOnce(UnixListener) -> F,
    ) -> (Qmp, tokio::task::JoinHandle<F::Output>, tempfile::TempDir)
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let task = tokio::spawn(peer(UnixListener::bind(&path).unwrap()));
        let stream = UnixStream::connect(&path).await.unwrap();
        let qmp = Qmp::handshake(stream, Duration::from_secs(30), Instant::now()).await.expect("handshake");
        (qmp, task, dir)
    }

    #[tokio::test]
    async fn an_event_the_schema_does_not_know_is_logged_and_skipped() {
        let (qmp, peer, _dir) = connect(fake_qemu).await;
        let limit = Duration::from_secs(30);

        let version = qmp.execute(qmp::query_version {}).await.expect("the client still answers after the event");
        assert_eq!((version.qemu.major, version.qemu.minor), (7, 2));
        let stop = qmp.wait_event(|e| matches!(e, qmp::Event::STOP { .. }), limit).await;
        assert!(stop.is_some(), "later known events still arrive");
        qmp.execute(qmp::cont {}).await.expect("and later commands too");

        let received = peer.await.unwrap().unwrap();
        assert!(received[0].contains("qmp_capabilities") && received[1].contains("query-version"), "{received:?}");
        let transcript = qmp.transcript().text();
        assert!(transcript.contains("event HVO_NO_SUCH_EVENT skipped"), "{transcript}");
    }

    /// A peer that does the handshake, then never answers again.
    async fn silent_qemu(listener: UnixListener) -> std::io::Result<()> {
        let (mut lines, _write, _) = greet(listener).await?;
        while lines.next_line().await?.is_some() {}
        Ok(())
    }

    #[tokio::test]
    async fn after_a_command_times_out_later_ones_are_refused_not_sent() {
        let (qmp, _peer, _dir) = connect(silent_qemu).await;
        let first = qmp.execute_within(qmp::query_status {}, Duration::from_millis(50)).await;
        assert!(matches!(first, Err(QmpError::Timeout { command: "query-status", .. })), "{first:?}");
        let second = qmp.execute_within(qmp::quit {}, Duration::from_secs(30)).await;
        assert!(matches!(second, Err(QmpError::Unanswered { command: "quit", earlier: "query-status" })), "{second:?}");
    }
}
