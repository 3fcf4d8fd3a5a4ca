//! The way into one connection: a queue of frames bounded in count *and* bytes, and a one-shot
//! close signal.
//!
//! Two ways out of the queue. A websocket gives the queue its socket (a [`Wire`]): a frame
//! queued while nothing is waiting is written straight into the socket by whichever thread
//! queues it, one `write()` and no task wake-up, and frames wait in the queue only while the
//! socket would block: then the wire starts a task that writes them once the socket is
//! writable and ends when they are written ([`Wire::blocked`]), so an idle connection has no
//! writer task at all. A transport without a wire (SSE) has its writer drain the queue
//! ([`Inbox::recv`]).
//!
//! Everything written to the connection goes through the one queue and counts against the
//! one byte bound, the pongs that the websocket layer writes by itself included, so a client
//! that pings and never reads is closed with 4008 like any slow reader.
//!
//! Publishers never wait on a client: [`Outbox::push`] never blocks, and a full queue closes
//! the connection with 4008 instead of slowing anyone else down. The byte bound matters as much
//! as the count: replies can be up to 1 MiB, so a count alone would let one client that never
//! reads pin a gigabyte.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

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
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
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

/// What a connection's queue holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A message, framed by the transport when it is written.
    Text(Text),
    /// Bytes already in the transport's own framing (a websocket ping, pong or close frame),
    /// written as they are. Only a queue with a [`Wire`] takes them.
    Raw(Bytes),
}

impl Item {
    /// The bytes it counts against the queue's bound.
    fn len(&self) -> usize {
        match self {
            Item::Text(text) => text.len(),
            Item::Raw(raw) => raw.len(),
        }
    }
}

/// A socket the queue writes into without waiting: the websocket's.
pub trait Wire: Send + Sync + std::fmt::Debug {
    /// Bytes `item` takes on the wire.
    fn encoded_len(&self, item: &Item) -> usize;

    /// Writes what the socket takes now of `first` then `then`, beginning `skip` bytes into the
    /// encoding of the first item; returns the bytes written, 0 when the socket would block.
    fn try_write(&self, first: &[Item], then: &[Item], skip: usize) -> io::Result<usize>;

    /// Frames had to wait: write them with `flush` once the socket is writable, until
    /// [`Flush::flush`] says none is left or [`Flush::finished`] resolves. Called once per
    /// stretch of waiting, from the thread that queued.
    fn blocked(self: Arc<Self>, flush: Flush);

    /// The transport's keepalive frame.
    fn ping(&self) -> Bytes;
}

/// A one-shot "close this connection" signal; the first reason wins.
#[derive(Debug, Default)]
pub struct Closer {
    /// Set once, before `fired` is cancelled, so a woken waiter always finds it.
    reason: OnceLock<Disconnect>,
    /// Wakes whoever selects on it: the session's loop, SSE's event stream.
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

/// A connection's [`Closer`], held apart from its outbox ([`Outbox::close_signal`]).
#[derive(Clone)]
pub struct CloseSignal(Arc<Queue>);

impl std::fmt::Debug for CloseSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("CloseSignal").field(&self.0.closer).finish()
    }
}

impl std::ops::Deref for CloseSignal {
    type Target = Closer;

    fn deref(&self) -> &Closer {
        &self.0.closer
    }
}

/// Limits of one connection's queue.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    /// Most frames queued.
    pub frames: usize,
    /// Most bytes queued (the messages' lengths).
    pub bytes: usize,
}

/// The queue shared by a connection's outboxes and its inbox.
#[derive(Debug)]
struct Queue {
    /// `std` lock: held only to queue, take or write without waiting, never across an
    /// `.await`. Every write into the wire happens under it, so bytes never interleave.
    state: Mutex<State>,
    /// The waker of the queue's one waiter ([`Queue::until`]): one atomic swap per wake,
    /// cheaper than a `Notify`'s waiter list.
    ready: AtomicWaker,
    limits: QueueLimits,
    /// Shared by every outbox and by the connection's reader and writer ([`CloseSignal`]);
    /// inline, as [`Queue::offer`] reads it for every frame.
    closer: Closer,
    /// The socket frames are written into straight from [`Outbox::push`], if the transport
    /// has one.
    wire: Option<Arc<dyn Wire>>,
}

#[derive(Debug, Default)]
struct State {
    /// Empty until a frame has to wait: an idle connection's queue allocates nothing (a channel
    /// would allocate a block of slots up front, the largest part of an idle connection).
    /// With a wire, frames are here only while the socket would block.
    frames: VecDeque<Item>,
    bytes: usize,
    /// Bytes of the first frame's encoding already written (with a wire).
    skip: usize,
    /// Live [`Outbox`] handles; at zero a draining reader ([`Inbox::recv`]) sees the end.
    senders: usize,
    /// The inbox refuses further frames.
    closed: bool,
    /// With a wire: a [`Flush`] task writes the waiting frames.
    flushing: bool,
}

impl State {
    /// Puts `item` at the end of the queue, counting its bytes.
    fn enqueue(&mut self, item: Item) {
        self.bytes += item.len();
        self.frames.push_back(item);
    }
}

/// Frames of capacity kept when the queue drains: a burst's buffer is not held forever.
const KEEP_CAPACITY: usize = 16;

/// Why a frame was not queued.
enum Refused {
    /// The connection is closing (or its socket failed).
    Closing,
    /// No room for it now.
    Full(Item),
}

impl Queue {
    /// Queues `item`, or with a wire and nothing waiting, writes it now.
    fn offer(self: &Arc<Self>, item: Item) -> Result<(), Refused> {
        let mut state = self.state.lock().unwrap();
        if state.closed || self.closer.reason().is_some() {
            return Err(Refused::Closing);
        }
        if state.frames.len() >= self.limits.frames || state.bytes + item.len() > self.limits.bytes
        {
            return Err(Refused::Full(item));
        }
        let Some(wire) = &self.wire else {
            state.enqueue(item);
            drop(state);
            self.ready.wake();
            return Ok(());
        };
        if !state.frames.is_empty() {
            // The socket would block and a flush task waits for it: in line behind the others.
            state.enqueue(item);
            return Ok(());
        }
        match wire.try_write(std::slice::from_ref(&item), &[], 0) {
            Ok(n) if n == wire.encoded_len(&item) => Ok(()),
            Ok(n) => {
                // The socket took part of it, or nothing: the rest waits for it to drain.
                state.skip = n;
                state.enqueue(item);
                let start = !std::mem::replace(&mut state.flushing, true);
                drop(state);
                if start {
                    wire.clone().blocked(Flush {
                        queue: self.clone(),
                    });
                }
                Ok(())
            }
            Err(e) => {
                self.failed(state, &e);
                Err(Refused::Closing)
            }
        }
    }

    /// Writes what the wire takes now of the queued frames; `Ok(true)` once none is left
    /// (then, for the flush task (`task`), its stretch of waiting is over).
    fn flush(&self, task: bool) -> io::Result<bool> {
        let Some(wire) = &self.wire else {
            return Ok(true);
        };
        let mut state = self.state.lock().unwrap();
        while !state.frames.is_empty() {
            let (first, then) = state.frames.as_slices();
            let written = match wire.try_write(first, then, state.skip) {
                Ok(0) => return Ok(false),
                Ok(n) => n,
                Err(e) => {
                    self.failed(state, &e);
                    return Err(e);
                }
            };
            let mut left = state.skip + written;
            state.skip = 0;
            while let Some(front) = state.frames.front() {
                let len = wire.encoded_len(front);
                if left < len {
                    state.skip = left;
                    break;
                }
                left -= len;
                let taken = front.len();
                state.bytes -= taken;
                state.frames.pop_front();
            }
        }
        shrink(&mut state.frames);
        if task {
            state.flushing = false;
        }
        Ok(true)
    }

    /// The socket failed (the client is gone): nothing more is queued or written.
    fn failed(&self, state: MutexGuard<'_, State>, error: &io::Error) {
        tracing::debug!(%error, "write failed");
        self.finish(state);
    }

    /// Refuses and drops everything, and ends a flush task.
    fn finish(&self, mut state: MutexGuard<'_, State>) {
        state.closed = true;
        state.frames.clear();
        state.bytes = 0;
        state.skip = 0;
        drop(state);
        self.ready.wake();
    }
}

impl Queue {
    /// Resolves with `check`'s answer once it has one, registering the queue's waker between
    /// two looks so that a change in between is not missed. One waiter at a time: the inbox's
    /// reader (SSE), or a wire's flush task.
    async fn until<T>(&self, mut check: impl FnMut(&mut State) -> Option<T>) -> T {
        std::future::poll_fn(|cx| {
            if let Some(t) = check(&mut self.state.lock().unwrap()) {
                return Poll::Ready(t);
            }
            self.ready.register(cx.waker());
            check(&mut self.state.lock().unwrap()).map_or(Poll::Pending, Poll::Ready)
        })
        .await
    }
}

/// Lets a drained queue's buffer go, but for a few slots.
fn shrink(frames: &mut VecDeque<Item>) {
    if frames.is_empty() && frames.capacity() > KEEP_CAPACITY {
        frames.shrink_to(KEEP_CAPACITY);
    }
}

/// The handle of the task that writes a wire's waiting frames ([`Wire::blocked`]).
#[derive(Debug)]
pub struct Flush {
    queue: Arc<Queue>,
}

impl Flush {
    /// Writes what the socket takes now; `Ok(true)`: nothing waits any more, the task ends.
    pub fn flush(&self) -> io::Result<bool> {
        self.queue.flush(true)
    }

    /// Resolves once the connection is over (or its socket failed): the task ends.
    pub async fn finished(&self) {
        self.queue.until(|state| state.closed.then_some(())).await
    }
}

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
            // Never a second panic while unwinding from a first.
            let mut state = self
                .queue
                .state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
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
        Self::make(limits, None)
    }

    /// A new outbox that writes into `wire` itself while the socket takes bytes (what had to
    /// wait is the wire's to write: [`Wire::blocked`]). The inbox closes the connection's
    /// queue ([`Inbox::close_with`], [`Inbox::flush`]) and ends it when dropped.
    pub fn with_wire(limits: QueueLimits, wire: Arc<dyn Wire>) -> (Outbox, Inbox) {
        Self::make(limits, Some(wire))
    }

    fn make(limits: QueueLimits, wire: Option<Arc<dyn Wire>>) -> (Outbox, Inbox) {
        let queue = Arc::new(Queue {
            state: Mutex::new(State {
                senders: 1,
                ..State::default()
            }),
            ready: AtomicWaker::new(),
            limits,
            closer: Closer::default(),
            wire,
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
        self.queue.push(Item::Text(text))
    }

    /// Queues bytes already in the transport's framing (a pong the websocket layer wrote by
    /// itself), like [`Outbox::push`]. Only for a queue with a wire.
    pub fn push_raw(&self, raw: Bytes) -> bool {
        debug_assert!(self.queue.wire.is_some(), "raw frames need a wire");
        self.queue.push(Item::Raw(raw))
    }

    /// Whether the transport has keepalives of its own to send ([`Outbox::ping`]).
    pub fn pings(&self) -> bool {
        self.queue.wire.is_some()
    }

    /// Queues the transport's keepalive like any frame (a full queue closes with 4008).
    pub fn ping(&self) {
        if let Some(wire) = &self.queue.wire {
            self.queue.push(Item::Raw(wire.ping()));
        }
    }

    /// Queues a text frame if there is room for it now. Unlike [`Outbox::push`] a full queue
    /// does not close the connection: the frame comes back (`Err(Some)`) for a later try.
    /// `Err(None)`: the connection is closing.
    pub fn try_push(&self, text: Text) -> Result<(), Option<Text>> {
        match self.queue.offer(Item::Text(text)) {
            Ok(()) => Ok(()),
            Err(Refused::Closing) => Err(None),
            Err(Refused::Full(Item::Text(text))) => Err(Some(text)),
            Err(Refused::Full(Item::Raw(_))) => unreachable!("a text was offered"),
        }
    }

    /// Whether a frame of `len` bytes could ever be queued: one larger than the whole byte
    /// bound is not for this connection (and is no reason to close it).
    pub fn fits(&self, len: usize) -> bool {
        len <= self.queue.limits.bytes
    }

    /// The connection's close signal.
    pub fn closer(&self) -> &Closer {
        &self.queue.closer
    }

    /// The connection's close signal, to keep: unlike an outbox it is not a sender, so holding
    /// it does not keep a draining reader waiting.
    pub fn close_signal(&self) -> CloseSignal {
        CloseSignal(self.queue.clone())
    }
}

impl Queue {
    /// [`Queue::offer`], closing the connection with 4008 when there is no room.
    fn push(self: &Arc<Self>, item: Item) -> bool {
        match self.offer(item) {
            Ok(()) => true,
            Err(Refused::Closing) => false,
            Err(Refused::Full(_)) => {
                if self.closer.reason().is_none() {
                    tracing::warn!("outbound queue full: closing slow client with 4008");
                }
                self.closer.close(Disconnect::Slow);
                false
            }
        }
    }
}

impl Inbox {
    /// The next frame if one is queued; `Err(())` once the queue has ended (every outbox
    /// dropped) and is empty.
    fn take(state: &mut State) -> Result<Option<Text>, ()> {
        loop {
            match state.frames.pop_front() {
                Some(item) => {
                    state.bytes -= item.len();
                    shrink(&mut state.frames);
                    match item {
                        Item::Text(text) => return Ok(Some(text)),
                        // Never queued without a wire, and a wire's frames are not taken.
                        Item::Raw(_) => continue,
                    }
                }
                None if state.senders == 0 || state.closed => return Err(()),
                None => return Ok(None),
            }
        }
    }

    /// The next frame; `None` once every [`Outbox`] is dropped and the queue is empty.
    pub async fn recv(&mut self) -> Option<Text> {
        self.queue
            .until(|state| match Self::take(state) {
                Ok(Some(text)) => Some(Some(text)),
                Err(()) => Some(None),
                Ok(None) => None,
            })
            .await
    }

    /// The next frame if one is queued.
    pub fn try_recv(&mut self) -> Option<Text> {
        Self::take(&mut self.queue.state.lock().unwrap())
            .ok()
            .flatten()
    }

    /// With a wire: writes what the socket takes now; `Ok(true)` once nothing waits.
    pub fn flush(&self) -> io::Result<bool> {
        self.queue.flush(false)
    }

    /// Drops every queued frame but one already partly written (it must be finished before
    /// anything else can be framed after it); what a slow client's close does.
    pub fn drop_unwritten(&self) {
        let mut state = self.queue.state.lock().unwrap();
        let keep = usize::from(state.skip > 0);
        state.frames.truncate(keep);
        state.bytes = state.frames.iter().map(Item::len).sum();
    }

    /// Refuses further frames and queues `last` (the close frame) after what is queued,
    /// beyond the bounds.
    pub fn close_with(&self, last: Bytes) {
        let mut state = self.queue.state.lock().unwrap();
        if state.closed {
            // The socket failed: nothing more can be written.
            return;
        }
        state.closed = true;
        state.enqueue(Item::Raw(last));
    }
}

impl Drop for Inbox {
    /// The connection is over: nothing more is queued or written, and a flush task ends.
    fn drop(&mut self) {
        // Never a second panic while unwinding from a first.
        let state = self
            .queue
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.queue.finish(state);
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

    /// A socket in memory: each item is encoded as `|` and its bytes; it takes at most `room`
    /// more bytes, or fails once `broken`.
    #[derive(Debug, Default)]
    struct FakeWire {
        written: Mutex<Vec<u8>>,
        room: Mutex<usize>,
        broken: std::sync::atomic::AtomicBool,
        /// The flush handles it was given, one per stretch of waiting.
        flushes: Mutex<Vec<Flush>>,
    }

    impl FakeWire {
        fn with_room(room: usize) -> Arc<FakeWire> {
            let wire = FakeWire::default();
            *wire.room.lock().unwrap() = room;
            Arc::new(wire)
        }

        fn make_room(&self, room: usize) {
            *self.room.lock().unwrap() += room;
        }

        fn written(&self) -> String {
            String::from_utf8(self.written.lock().unwrap().clone()).unwrap()
        }

        fn flushes(&self) -> usize {
            self.flushes.lock().unwrap().len()
        }

        /// Flushes with the latest handle, as its task would.
        fn flush(&self) -> io::Result<bool> {
            self.flushes.lock().unwrap().last().unwrap().flush()
        }
    }

    impl Wire for FakeWire {
        fn encoded_len(&self, item: &Item) -> usize {
            item.len() + 1
        }

        fn try_write(&self, first: &[Item], then: &[Item], skip: usize) -> io::Result<usize> {
            if self.broken.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
            let mut encoded = Vec::new();
            for item in first.iter().chain(then) {
                encoded.push(b'|');
                encoded.extend_from_slice(match item {
                    Item::Text(text) => text.as_bytes(),
                    Item::Raw(raw) => raw,
                });
            }
            let mut room = self.room.lock().unwrap();
            let n = (encoded.len() - skip).min(*room);
            *room -= n;
            self.written
                .lock()
                .unwrap()
                .extend_from_slice(&encoded[skip..skip + n]);
            Ok(n)
        }

        fn blocked(self: Arc<Self>, flush: Flush) {
            self.flushes.lock().unwrap().push(flush);
        }

        fn ping(&self) -> Bytes {
            Bytes::from_static(b"P")
        }
    }

    const WIDE: QueueLimits = QueueLimits {
        frames: 100,
        bytes: 1 << 20,
    };

    #[tokio::test]
    async fn with_room_in_the_socket_a_push_is_written_at_once_and_nothing_is_queued() {
        let wire = FakeWire::with_room(1000);
        let (out, inbox) = Outbox::with_wire(WIDE, wire.clone());
        assert!(out.push("hello".into()));
        assert!(out.push("again".into()));
        out.ping();
        assert_eq!(wire.written(), "|hello|again|P");
        assert_eq!(wire.flushes(), 0, "no task");
        let state = inbox.queue.state.lock().unwrap();
        assert_eq!((state.frames.capacity(), state.bytes), (0, 0));
    }

    #[tokio::test]
    async fn what_the_socket_cannot_take_waits_in_order_for_one_flush_task() {
        let wire = FakeWire::with_room(4);
        let (out, inbox) = Outbox::with_wire(WIDE, wire.clone());
        assert!(out.push("first".into()), "partly written");
        assert!(out.push("second".into()), "queued behind it");
        out.ping();
        assert_eq!(wire.written(), "|fir");
        assert_eq!(wire.flushes(), 1, "one task for the stretch of waiting");
        assert!(!wire.flush().unwrap(), "still no room");
        wire.make_room(6);
        assert!(!wire.flush().unwrap());
        assert_eq!(
            wire.written(),
            "|first|sec",
            "the rest of the first, then more"
        );
        wire.make_room(100);
        assert!(wire.flush().unwrap());
        assert_eq!(wire.written(), "|first|second|P");
        assert!(out.push("third".into()), "straight in again");
        assert_eq!(wire.written(), "|first|second|P|third");
        assert_eq!(inbox.queue.state.lock().unwrap().bytes, 0);
        *wire.room.lock().unwrap() = 0;
        assert!(out.push("fourth".into()));
        assert_eq!(wire.flushes(), 2, "a new stretch of waiting, a new task");
    }

    #[tokio::test]
    async fn a_slow_close_finishes_the_frame_in_progress_then_writes_the_close_frame_last() {
        let wire = FakeWire::with_room(3);
        let (out, inbox) = Outbox::with_wire(WIDE, wire.clone());
        assert!(out.push("started".into()));
        assert!(out.push("never".into()));
        inbox.drop_unwritten();
        inbox.close_with(Bytes::from_static(b"CLOSE"));
        assert!(!out.push("after".into()), "nothing after the close frame");
        wire.make_room(100);
        assert!(inbox.flush().unwrap());
        assert_eq!(wire.written(), "|started|CLOSE");
        drop(inbox);
        let flush = wire.flushes.lock().unwrap().pop().unwrap();
        flush.finished().await;
    }

    #[tokio::test]
    async fn a_failed_socket_refuses_further_frames_and_ends_the_flush_task() {
        let wire = FakeWire::with_room(0);
        let (out, inbox) = Outbox::with_wire(WIDE, wire.clone());
        assert!(out.push("queued".into()));
        wire.broken
            .store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(inbox.flush().is_err());
        assert!(!out.push("more".into()));
        let flush = wire.flushes.lock().unwrap().pop().unwrap();
        flush.finished().await;
        assert_eq!(
            out.closer().reason(),
            None,
            "the reader sees the client gone"
        );
    }

    #[tokio::test]
    async fn pongs_to_a_client_that_never_reads_count_against_the_byte_bound() {
        let wire = FakeWire::with_room(0);
        let (out, _inbox) = Outbox::with_wire(
            QueueLimits {
                frames: 100,
                bytes: 10,
            },
            wire,
        );
        assert!(out.push("123456".into()));
        assert!(out.push_raw(Bytes::from_static(b"pong")));
        assert!(
            !out.push_raw(Bytes::from_static(b"p")),
            "4 + 6 bytes fill the bound"
        );
        assert_eq!(out.closer().reason(), Some(Disconnect::Slow));
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
