//! The websocket's way out: [`WsWire`], the socket that a connection's queue writes frames into
//! straight from the thread that delivers them (framing them on the way: a server's frames are
//! not masked, so a fan-out's text is framed by a header of at most 10 bytes and written with
//! its payload in one `send`), the task that writes what had to wait once the socket is
//! writable (it exists only while something waits), and the closing of the connection: what
//! is queued, the close frame, the end of our side. With the reader in [`crate::ws`], the only
//! place that knows websocket frames.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::Interest;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::time::Instant;
use tracing::Instrument;

use crate::error::Disconnect;
use crate::outbox::{Flush, Inbox, Item, Wire};

/// How long closing may take in all (queued frames, then the close frame) before the socket
/// is dropped.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most frames written by one `sendmsg`.
const MAX_BATCH: usize = 64;
/// The longest frame header: 2 bytes and a 64-bit length.
const MAX_HEADER: usize = 10;
/// The largest text copied behind its header for one `send` rather than written as two pieces
/// with `sendmsg`.
const COPY_LIMIT: usize = 1024;
/// A ping with no payload.
const PING: &[u8] = &[0x89, 0x00];

/// The write half of a websocket's TCP socket.
///
/// Frames are written with `send` on the descriptor itself, not through tokio's `try_write`:
/// tokio's readiness flag lives in an allocation of its own, one more cache miss per
/// recipient of a fan-out, and a send that would block needs no bookkeeping there (with
/// `MSG_NOSIGNAL`: a client's reset is an error, never a SIGPIPE, whatever the embedding
/// program does with that signal). Only the flush task, which waits for the socket, goes
/// through tokio ([`WsWire::flush_ready`]), so the readiness it waits on is cleared when a
/// send would block.
#[derive(Debug)]
pub struct WsWire {
    /// `socket`'s descriptor, valid as long as `socket` lives (it closes when both halves
    /// are dropped, and this one is dropped with the wire). Kept here, next to the rest of
    /// the wire: reading it through `socket` is one more pointer to follow per send.
    fd: RawFd,
    socket: OwnedWriteHalf,
    /// Where flush tasks run: frames can be queued from any thread.
    runtime: tokio::runtime::Handle,
    /// The connection's span, for the flush task's log lines (it is started on whichever
    /// thread queued, inside another span, or none).
    span: tracing::Span,
}

impl WsWire {
    /// The wire over a connection's write half. Call it inside the runtime, in the
    /// connection's span.
    pub fn new(socket: OwnedWriteHalf) -> WsWire {
        WsWire {
            fd: socket.as_ref().as_raw_fd(),
            socket,
            runtime: tokio::runtime::Handle::current(),
            span: tracing::Span::current(),
        }
    }

    /// Ends our side of the TCP connection (FIN), after the close frame.
    fn shutdown(&self) {
        let _ = socket2::SockRef::from(self.socket.as_ref()).shutdown(std::net::Shutdown::Write);
    }

    /// The socket, without going through tokio's registration.
    fn raw(&self) -> BorrowedFd<'_> {
        // SAFETY: `fd` belongs to `socket`, which `self` owns: it stays open while `self`
        // (and so the returned borrow) lives.
        unsafe { BorrowedFd::borrow_raw(self.fd) }
    }

    /// Waits until the socket is writable, then runs `flush` (`Ok(false)`: the socket would
    /// block again) through tokio, so that a send that would block clears the readiness
    /// waited on and the next wait is for the socket, not for a stale flag.
    async fn flush_ready(&self, flush: impl Fn() -> io::Result<bool>) -> io::Result<bool> {
        self.socket.writable().await?;
        let flushed = self
            .socket
            .as_ref()
            .try_io(Interest::WRITABLE, || match flush() {
                Ok(false) => Err(io::ErrorKind::WouldBlock.into()),
                done => done,
            });
        match flushed {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            done => done,
        }
    }
}

/// Writes the header of an unmasked final text frame of `len` bytes; returns its length.
fn text_header(len: usize, out: &mut [u8]) -> usize {
    out[0] = 0x81;
    let n = text_header_len(len);
    match n {
        2 => out[1] = len as u8,
        4 => {
            out[1] = 126;
            out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out[1] = 127;
            out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        }
    }
    n
}

/// The length of a text frame's header.
fn text_header_len(len: usize) -> usize {
    match len {
        0..126 => 2,
        126..=0xFFFF => 4,
        _ => 10,
    }
}

impl Wire for WsWire {
    fn encoded_len(&self, item: &Item) -> usize {
        match item {
            Item::Text(text) => text_header_len(text.len()) + text.len(),
            Item::Raw(raw) => raw.len(),
        }
    }

    fn try_write(&self, first: &[Item], then: &[Item], skip: usize) -> io::Result<usize> {
        let written = match (first, then) {
            // One small frame, the fan-out's case: copied whole behind its header and written
            // with one `send`, cheaper in the kernel than a `sendmsg` of two pieces.
            ([Item::Text(text)], []) if text.len() <= COPY_LIMIT => {
                let mut frame = [0u8; MAX_HEADER + COPY_LIMIT];
                let n = text_header(text.len(), &mut frame);
                frame[n..n + text.len()].copy_from_slice(text.as_bytes());
                socket2::SockRef::from(&self.raw())
                    .send_with_flags(&frame[skip..n + text.len()], libc::MSG_NOSIGNAL)
            }
            _ => self.write_vectored(first, then, skip),
        };
        match written {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => Err(e),
        }
    }

    fn blocked(self: Arc<Self>, flush: Flush) {
        let (runtime, span) = (self.runtime.clone(), self.span.clone());
        runtime.spawn(flush_when_writable(self, flush).instrument(span));
    }

    fn ping(&self) -> Bytes {
        Bytes::from_static(PING)
    }
}

/// Writes the waiting frames each time the socket becomes writable, until none is left or the
/// connection is over. (If waiting for the socket fails, the frames stay: the connection ends
/// through its reader, or closes with 4008 once its queue is full.)
async fn flush_when_writable(wire: Arc<WsWire>, flush: Flush) {
    loop {
        tokio::select! {
            biased;
            () = flush.finished() => return,
            flushed = wire.flush_ready(|| flush.flush()) => match flushed {
                Ok(false) => {}
                _ => return,
            },
        }
    }
}

impl WsWire {
    /// Writes up to [`MAX_BATCH`] frames with one `sendmsg`, each as its header and its text.
    fn write_vectored(&self, first: &[Item], then: &[Item], skip: usize) -> io::Result<usize> {
        let items = first.iter().chain(then).take(MAX_BATCH);
        let mut headers = [[0u8; MAX_HEADER]; MAX_BATCH];
        let mut header_lens = [0usize; MAX_BATCH];
        for ((item, header), len) in items.clone().zip(&mut headers).zip(&mut header_lens) {
            if let Item::Text(text) = item {
                *len = text_header(text.len(), header);
            }
        }
        let mut slices = [IoSlice::new(&[]); 2 * MAX_BATCH];
        let mut used = 0;
        for ((item, header), len) in items.zip(&headers).zip(header_lens) {
            match item {
                Item::Text(text) => {
                    slices[used] = IoSlice::new(&header[..len]);
                    slices[used + 1] = IoSlice::new(text.as_bytes());
                    used += 2;
                }
                Item::Raw(raw) => {
                    slices[used] = IoSlice::new(raw);
                    used += 1;
                }
            }
        }
        let mut slices = &mut slices[..used];
        IoSlice::advance_slices(&mut slices, skip);
        socket2::SockRef::from(&self.raw()).send_vectored_with_flags(slices, libc::MSG_NOSIGNAL)
    }
}

/// The close frame for `reason`.
fn close_frame(reason: Disconnect) -> Bytes {
    let text = reason.reason().as_bytes();
    let mut frame = BytesMut::with_capacity(4 + text.len());
    // Every reason is far shorter than a control frame's 125 bytes.
    frame.put_u8(0x88);
    frame.put_u8((2 + text.len()) as u8);
    frame.put_u16(reason.code());
    frame.put_slice(text);
    frame.freeze()
}

/// Writes what waits until nothing does; `Err` when the socket failed.
async fn drain(wire: &WsWire, inbox: &Inbox) -> io::Result<()> {
    if inbox.flush()? {
        return Ok(());
    }
    while !wire.flush_ready(|| inbox.flush()).await? {}
    Ok(())
}

/// Closes the connection's way out, after its session: what is queued is written (for half
/// the budget; a slow client's is dropped), then the close frame if there is a `reason`, then
/// our side of the TCP connection ends. Nothing is queued or written afterwards.
pub async fn close(wire: &WsWire, inbox: Inbox, reason: Option<Disconnect>) {
    let deadline = Instant::now() + CLOSE_TIMEOUT;
    match reason {
        // A slow client is closed at once: its queue is the problem.
        Some(reason) if !reason.drains_queue() => inbox.drop_unwritten(),
        // Replies already queued (answers to requests finished during shutdown, the answer to
        // a client's close) are still written, but the close frame must get its turn.
        _ => {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT / 2, drain(wire, &inbox)).await;
        }
    }
    if let Some(reason) = reason {
        // After what is left of an unfinished frame: never in the middle of one.
        inbox.close_with(close_frame(reason));
        let _ = tokio::time::timeout_at(deadline, drain(wire, &inbox)).await;
    }
    drop(inbox);
    wire.shutdown();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_headers_take_the_shortest_length_that_fits() {
        let mut header = [0u8; MAX_HEADER];
        for (len, want) in [
            (0, &[0x81, 0][..]),
            (125, &[0x81, 125]),
            (126, &[0x81, 126, 0, 126]),
            (65535, &[0x81, 126, 0xFF, 0xFF]),
            (65536, &[0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0]),
        ] {
            let n = text_header(len, &mut header);
            assert_eq!(&header[..n], want, "length {len}");
            assert_eq!(text_header_len(len), n);
        }
    }

    /// What the wire writes into a real socket, cut anywhere, reads back as the frames.
    #[tokio::test]
    async fn frames_written_from_any_offset_arrive_whole() {
        use crate::outbox::Text;
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (_read, write) = server.into_split();
        let wire = WsWire::new(write);
        let small = Item::Text(Text::from("small"));
        let large = Item::Text(Text::from("y".repeat(70_000)));
        let raw = Item::Raw(Bytes::from_static(PING));
        let mut expected = vec![0x81, 5];
        expected.extend_from_slice(b"small");
        expected.extend_from_slice(&[0x81, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]);
        expected.extend(std::iter::repeat_n(b'y', 70_000));
        expected.extend_from_slice(PING);
        assert_eq!(
            [&small, &large, &raw]
                .map(|i| wire.encoded_len(i))
                .iter()
                .sum::<usize>(),
            expected.len()
        );
        // The small frame alone, from its third byte on (as after a partial write of two).
        let n = wire
            .try_write(std::slice::from_ref(&small), &[], 2)
            .unwrap();
        assert_eq!(n, 5);
        // Then the rest in batches, split across the queue's two slices, from any offset.
        let (first, then) = ([large], [raw]);
        let total = expected.len() - 7;
        let mut done = 0;
        let mut received = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        while done < total {
            match wire.try_write(&first, &then, done).unwrap() {
                // Everything written was read: the socket frees its buffer in a moment.
                0 => tokio::time::sleep(Duration::from_millis(1)).await,
                n => done += n,
            }
            while received.len() < 5 + done {
                let n = client.read(&mut buf).await.unwrap();
                received.extend_from_slice(&buf[..n]);
            }
        }
        assert_eq!(&received[..], &expected[2..]);
    }

    /// The CPU time (user and system) of this process's threads named `name`.
    fn threads_cpu(name: &str) -> Duration {
        let mut ticks = 0;
        for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if comm.trim_end() != name {
                continue;
            }
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            let fields = crate::metrics::stat_fields(&stat);
            // utime and stime, proc(5)'s fields 14 and 15.
            for n in [14, 15] {
                ticks += fields
                    .get(n - 3)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
        Duration::from_secs_f64(ticks as f64 / crate::metrics::clock_ticks())
    }

    /// Frames are written from the queuing thread without tokio's bookkeeping, so the flush
    /// task may find a stale "writable": it must then wait for the socket, not spin on it.
    /// The flush task runs on a runtime of its own, whose thread's CPU time is watched while
    /// the client does not read (a spinning task would also stop that runtime's timers, so
    /// the test itself only sleeps and reads with std).
    #[test]
    fn a_blocked_socket_is_waited_on_not_polled_and_resumed_when_read() {
        use crate::outbox::{Outbox, QueueLimits, Text};
        use std::io::Read;
        const THREAD: &str = "wire-flush-test";
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(THREAD)
            .enable_all()
            .build()
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        let (out, inbox) = {
            let _inside = runtime.enter();
            let (_read, write) = tokio::net::TcpStream::from_std(server)
                .unwrap()
                .into_split();
            let limits = QueueLimits {
                frames: 1000,
                bytes: 64 << 20,
            };
            Outbox::with_wire(limits, Arc::new(WsWire::new(write)))
        };
        // Far more than loopback's socket buffers hold, with nobody reading.
        let frame = "z".repeat(60_000);
        for _ in 0..400 {
            assert!(out.push(Text::from(frame.clone())));
        }
        let before = threads_cpu(THREAD);
        std::thread::sleep(Duration::from_millis(500));
        let spent = threads_cpu(THREAD) - before;
        if spent >= Duration::from_millis(150) {
            // A spinning task would keep the runtime's drop waiting forever.
            runtime.shutdown_background();
            panic!("{spent:?} of CPU in 500 ms while the socket was full");
        }
        // Once the client reads, the flush task writes the rest: every byte arrives.
        let expected = 400 * (4 + 60_000);
        let mut received = 0;
        let mut buf = vec![0u8; 1 << 16];
        while received < expected {
            let n = client
                .read(&mut buf)
                .expect("the flush task resumes when the socket is writable");
            assert!(n > 0);
            received += n;
        }
        assert_eq!(received, expected);
        drop((out, inbox));
    }

    #[test]
    fn close_frames_carry_the_code_and_the_reason() {
        let frame = close_frame(Disconnect::Slow);
        let reason = Disconnect::Slow.reason().as_bytes();
        assert_eq!(frame[0], 0x88);
        assert_eq!(usize::from(frame[1]), 2 + reason.len());
        assert_eq!(u16::from_be_bytes([frame[2], frame[3]]), 4008);
        assert_eq!(&frame[4..], reason);
    }
}
