//! The way into one connection: a queue of frames bounded in count *and* bytes, drained by the
//! connection's writer task, and a one-shot close signal.
//!
//! Everything written to the connection counts against the one byte bound, the pongs that the
//! websocket layer writes by itself included: the reader charges each pong
//! ([`Outbox::charge_control`]) and the writer releases the charge once a flush has put it on
//! the wire, so a client that pings and never reads is closed with 4008 like any slow reader.
//!
//! Publishers never wait on a client: [`Outbox::push`] never blocks, and a full queue closes
//! the connection with 4008 instead of slowing anyone else down. The byte bound matters as much
//! as the count: replies can be up to 1 MiB, so a count alone would let one client that never
//! reads pin a gigabyte.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use std::task::Poll;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use tokio_util::sync::CancellationToken;

use crate::error::Disconnect;

/// One serialized server → client message: JSON text, shared by every recipient of a fan-out
/// (cloning is a reference count). Transport-neutral: the websocket writer sends it as a text
/// frame, another transport writes the same bytes its own way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Text(Bytes);

impl Text {
    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        // Only ever built from `String` or `&str` (see the `From` impls), so always UTF-8.
        std::str::from_utf8(&self.0).expect("a Text is built from a str")
    }

    /// The bytes, guaranteed UTF-8.
    pub fn into_bytes(self) -> Bytes {
        self.0
    }

    /// Text from bytes the caller has already checked to be UTF-8 (a websocket text message
    /// is checked by the websocket layer). [`Text::as_str`] checks again, so a wrong caller
    /// gets a panic, never invalid text.
    pub(crate) fn from_validated(bytes: Bytes) -> Text {
        Text(bytes)
    }
}

impl From<String> for Text {
    fn from(s: String) -> Self {
        Text(Bytes::from(s))
    }
}

impl From<&'static str> for Text {
    fn from(s: &'static str) -> Self {
        Text(Bytes::from_static(s.as_bytes()))
    }
}

/// A one-shot "close this connection" signal; the first reason wins.
#[derive(Debug, Default)]
pub struct Closer {
    /// Set once, before `fired` is cancelled, so a woken waiter always finds it.
    reason: OnceLock<Disconnect>,
    /// Wakes the reader loop and the writer task, which both select on it.
    fired: CancellationToken,
}

impl Closer {
    /// Asks the connection to close for `reason`; later calls are ignored.
    pub fn close(&self, reason: Disconnect) {
        if self.reason.set(reason).is_ok() {
            self.fired.cancel();
        }
    }

    /// Resolves when closing was requested; then [`Closer::reason`] is set. One of these is
    /// kept and polled for a whole loop.
    pub fn fired(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.fired.cancelled()
    }

    /// The reason, if closing was requested.
    pub fn reason(&self) -> Option<Disconnect> {
        self.reason.get().copied()
    }
}

/// Limits of one connection's queue.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    /// Most frames queued.
    pub frames: usize,
    /// Most bytes queued (text frames' lengths).
    pub bytes: usize,
}

/// The queue shared by a connection's outboxes and its inbox.
#[derive(Debug)]
struct Queue {
    /// `std` lock: held only to push or pop, never across an `.await`.
    state: Mutex<State>,
    /// The writer's waker: one atomic swap per push, cheaper than a `Notify`'s waiter list.
    ready: AtomicWaker,
    limits: QueueLimits,
    /// Shared by every outbox and by the connection's reader and writer.
    closer: Arc<Closer>,
    /// Bytes of control frames (pongs) the websocket layer queued by itself and no flush has
    /// yet been seen to write; they count against the byte bound with the frames. Added under
    /// the state lock (so the bound holds); an atomic so the writer's per-batch read and
    /// release take no lock while it is zero.
    control: AtomicUsize,
}

#[derive(Debug, Default)]
struct State {
    /// Empty until the first frame: an idle connection's queue allocates nothing (a channel
    /// would allocate a block of slots up front, the largest part of an idle connection).
    frames: VecDeque<Text>,
    bytes: usize,
    /// A pong was charged since the writer last flushed: flush even without frames.
    flush_wanted: bool,
    /// Live [`Outbox`] handles; at zero the writer sees the end of the queue.
    senders: usize,
    /// The inbox refuses further frames.
    closed: bool,
}

/// Frames of capacity kept when the queue drains: a burst's buffer is not held forever.
const KEEP_CAPACITY: usize = 16;

/// A cloneable handle that queues frames for one connection.
#[derive(Debug)]
pub struct Outbox {
    queue: Arc<Queue>,
}

impl Clone for Outbox {
    fn clone(&self) -> Self {
        self.queue.state.lock().unwrap().senders += 1;
        Outbox {
            queue: self.queue.clone(),
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        let last = {
            let mut state = self.queue.state.lock().unwrap();
            state.senders -= 1;
            state.senders == 0
        };
        if last {
            self.queue.ready.wake();
        }
    }
}

/// The writer's end of an [`Outbox`].
#[derive(Debug)]
pub struct Inbox {
    queue: Arc<Queue>,
}

impl Outbox {
    /// A new outbox, and the inbox its writer drains.
    pub fn new(limits: QueueLimits) -> (Outbox, Inbox) {
        let queue = Arc::new(Queue {
            state: Mutex::new(State {
                senders: 1,
                ..State::default()
            }),
            ready: AtomicWaker::new(),
            limits,
            closer: Arc::new(Closer::default()),
            control: AtomicUsize::new(0),
        });
        (
            Outbox {
                queue: queue.clone(),
            },
            Inbox { queue },
        )
    }

    /// Queues a text frame without waiting. On overflow (frames or bytes) the connection is
    /// closed with 4008 and `false` returned; a connection that is already closing also
    /// returns `false`.
    pub fn push(&self, text: Text) -> bool {
        match self.try_push(text) {
            Ok(()) => true,
            Err(None) => false,
            Err(Some(_)) => {
                let q = &self.queue;
                if q.closer.reason().is_none() {
                    tracing::warn!("outbound queue full: closing slow client with 4008");
                }
                q.closer.close(Disconnect::Slow);
                false
            }
        }
    }

    /// Queues a text frame if there is room for it now. Unlike [`Outbox::push`] a full queue
    /// does not close the connection: the frame comes back (`Err(Some)`) for a later try.
    /// `Err(None)`: the connection is closing.
    pub fn try_push(&self, text: Text) -> Result<(), Option<Text>> {
        let q = &self.queue;
        let mut state = q.state.lock().unwrap();
        if state.closed || q.closer.reason().is_some() {
            return Err(None);
        }
        if state.frames.len() < q.limits.frames
            && state.bytes + q.control.load(Ordering::Relaxed) + text.len() <= q.limits.bytes
        {
            state.bytes += text.len();
            state.frames.push_back(text);
            drop(state);
            q.ready.wake();
            return Ok(());
        }
        Err(Some(text))
    }

    /// Counts `len` bytes of a control frame the websocket layer queued by itself (the pong to
    /// a client's ping) against the byte bound, and asks the writer to flush it. Over the
    /// bound the connection is closed with 4008 and `false` returned.
    pub fn charge_control(&self, len: usize) -> bool {
        let q = &self.queue;
        {
            let mut state = q.state.lock().unwrap();
            if state.closed {
                return false;
            }
            if state.bytes + q.control.load(Ordering::Relaxed) + len <= q.limits.bytes {
                q.control.fetch_add(len, Ordering::Relaxed);
                state.flush_wanted = true;
                drop(state);
                q.ready.wake();
                return true;
            }
        }
        if q.closer.reason().is_none() {
            tracing::warn!(
                "pongs to a client that does not read filled its queue: closing with 4008"
            );
        }
        q.closer.close(Disconnect::Slow);
        false
    }

    /// Whether a frame of `len` bytes could ever be queued: one larger than the whole byte
    /// bound is not for this connection (and is no reason to close it).
    pub fn fits(&self, len: usize) -> bool {
        len <= self.queue.limits.bytes
    }

    /// The connection's close signal.
    pub fn closer(&self) -> &Arc<Closer> {
        &self.queue.closer
    }
}

/// What the writer should do next.
#[derive(Debug, PartialEq)]
pub enum Next {
    /// Write this message.
    Frame(Text),
    /// Nothing queued, but pongs were charged: flush so they are written and released.
    Flush,
}

impl Inbox {
    /// The next frame if one is queued, else (when `flush` allows) a flush if one is wanted;
    /// `Err(())` once the queue has ended (every outbox dropped, or closed) and is empty.
    fn take(&self, flush: bool) -> Result<Option<Next>, ()> {
        let mut state = self.queue.state.lock().unwrap();
        match state.frames.pop_front() {
            Some(text) => {
                state.bytes -= text.len();
                if state.frames.is_empty() && state.frames.capacity() > KEEP_CAPACITY {
                    state.frames.shrink_to(KEEP_CAPACITY);
                }
                Ok(Some(Next::Frame(text)))
            }
            None if state.senders == 0 || state.closed => Err(()),
            None if flush && state.flush_wanted => {
                state.flush_wanted = false;
                Ok(Some(Next::Flush))
            }
            None => Ok(None),
        }
    }

    /// Control bytes charged and not yet released. Read it right *before* a flush and pass it
    /// to [`Inbox::release_control`] after the flush succeeded: what was charged before the
    /// flush was queued before it too, so the flush wrote it.
    pub fn control(&self) -> usize {
        self.queue.control.load(Ordering::Relaxed)
    }

    /// Releases `len` control bytes that a successful flush wrote.
    pub fn release_control(&self, len: usize) {
        if len > 0 {
            // Only this writer releases, and charges only add: `len` is never more than what
            // is there.
            self.queue.control.fetch_sub(len, Ordering::Relaxed);
        }
    }

    /// The next frame or flush; `None` once every [`Outbox`] is dropped and the queue is empty.
    pub async fn next(&mut self) -> Option<Next> {
        std::future::poll_fn(|cx| {
            let poll = |inbox: &Self| match inbox.take(true) {
                Ok(Some(msg)) => Poll::Ready(Some(msg)),
                Err(()) => Poll::Ready(None),
                Ok(None) => Poll::Pending,
            };
            if let Poll::Ready(next) = poll(self) {
                return Poll::Ready(next);
            }
            // Register, then look again: a push between the two is not missed.
            self.queue.ready.register(cx.waker());
            poll(self)
        })
        .await
    }

    /// The next frame; `None` once every [`Outbox`] is dropped and the queue is empty. A
    /// wanted flush is skipped.
    pub async fn recv(&mut self) -> Option<Text> {
        loop {
            match self.next().await? {
                Next::Frame(msg) => return Some(msg),
                Next::Flush => continue,
            }
        }
    }

    /// The next frame if one is queued. Leaves a wanted flush to [`Inbox::next`].
    pub fn try_recv(&mut self) -> Option<Text> {
        match self.take(false).ok().flatten()? {
            Next::Frame(msg) => Some(msg),
            Next::Flush => None,
        }
    }

    /// Refuses further frames; queued ones can still be taken.
    pub fn close(&mut self) {
        self.queue.state.lock().unwrap().closed = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOMY: QueueLimits = QueueLimits {
        frames: 2,
        bytes: 1 << 20,
    };

    #[tokio::test]
    async fn frame_overflow_closes_with_4008_and_never_blocks() {
        let (out, mut inbox) = Outbox::new(ROOMY);
        assert!(out.push("a".into()));
        assert!(out.push("b".into()));
        assert!(!out.push("c".into()));
        out.closer().fired().await;
        assert_eq!(out.closer().reason(), Some(Disconnect::Slow));
        assert_eq!(inbox.recv().await, Some(Text::from("a")));
    }

    #[tokio::test]
    async fn byte_overflow_closes_with_4008() {
        let (out, mut inbox) = Outbox::new(QueueLimits {
            frames: 100,
            bytes: 10,
        });
        assert!(out.push("12345".into()));
        assert!(out.push("12345".into()));
        assert!(!out.push("1".into()), "11 bytes would be over the limit");
        assert_eq!(out.closer().reason(), Some(Disconnect::Slow));
        inbox.try_recv().unwrap();
        assert_eq!(
            inbox.queue.state.lock().unwrap().bytes,
            5,
            "taking a frame releases its bytes"
        );
    }

    #[tokio::test]
    async fn the_writer_sees_the_end_when_every_outbox_is_gone() {
        let (out, mut inbox) = Outbox::new(QueueLimits {
            frames: 8,
            bytes: 1 << 20,
        });
        let other = out.clone();
        assert!(other.push("a".into()));
        drop(out);
        assert_eq!(inbox.recv().await, Some(Text::from("a")));
        let waiter = tokio::spawn(async move { inbox.recv().await });
        tokio::task::yield_now().await;
        drop(other);
        assert_eq!(waiter.await.unwrap(), None, "woken by the last drop");
    }

    #[tokio::test]
    async fn an_idle_queue_allocates_nothing_and_a_drained_one_shrinks() {
        let (out, mut inbox) = Outbox::new(QueueLimits {
            frames: 1000,
            bytes: 1 << 20,
        });
        assert_eq!(inbox.queue.state.lock().unwrap().frames.capacity(), 0);
        for _ in 0..500 {
            out.push("x".into());
        }
        while inbox.try_recv().is_some() {}
        assert!(inbox.queue.state.lock().unwrap().frames.capacity() <= KEEP_CAPACITY);
    }

    #[tokio::test]
    async fn pongs_count_against_the_byte_bound_until_a_flush_releases_them() {
        let (out, mut inbox) = Outbox::new(QueueLimits {
            frames: 100,
            bytes: 10,
        });
        assert!(out.charge_control(4));
        assert_eq!(
            inbox.next().await,
            Some(Next::Flush),
            "the writer is asked to flush"
        );
        assert!(out.push("123456".into()));
        assert!(!out.push("1".into()), "4 + 6 bytes fill the bound");
        assert_eq!(out.closer().reason(), Some(Disconnect::Slow));

        let (out, mut inbox) = Outbox::new(QueueLimits {
            frames: 100,
            bytes: 10,
        });
        assert!(out.charge_control(6));
        let before_flush = inbox.control();
        assert!(out.charge_control(4), "charged while the flush runs");
        inbox.release_control(before_flush);
        assert_eq!(inbox.control(), 4, "only what the flush wrote is released");
        assert!(
            !out.charge_control(7),
            "a client that never reads is closed"
        );
        assert_eq!(out.closer().reason(), Some(Disconnect::Slow));
        assert_eq!(inbox.try_recv(), None);
    }

    #[tokio::test]
    async fn first_close_reason_wins() {
        let (out, _inbox) = Outbox::new(ROOMY);
        out.closer().close(Disconnect::Shutdown);
        out.closer().close(Disconnect::Slow);
        out.closer().fired().await;
        assert_eq!(out.closer().reason(), Some(Disconnect::Shutdown));
    }
}
