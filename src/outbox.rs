//! The way into one connection: a queue of frames bounded in count *and* bytes, drained by the
//! connection's writer task, and a one-shot close signal.
//!
//! Publishers never wait on a client: [`Outbox::push`] is `try_send`, and a full queue closes
//! the connection with 4008 instead of slowing anyone else down. The byte bound matters as much
//! as the count: replies can be up to 1 MiB, so a count alone would let one client that never
//! reads pin a gigabyte.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;

use crate::error::Disconnect;

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

    /// Waits until [`Closer::close`] was called and returns its reason.
    pub async fn closed(&self) -> Disconnect {
        self.fired.cancelled().await;
        *self
            .reason
            .get()
            .expect("reason is set before the token fires")
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

/// A cloneable handle that queues frames for one connection.
#[derive(Debug, Clone)]
pub struct Outbox {
    /// Bounded by frame count; `try_send` only, so a publisher never waits.
    tx: mpsc::Sender<Message>,
    /// Bytes queued and not yet taken by the writer, shared with the [`Inbox`].
    queued: Arc<AtomicUsize>,
    max_bytes: usize,
    /// Shared by every clone and by the connection's reader and writer.
    closer: Arc<Closer>,
}

/// The writer's end of an [`Outbox`].
#[derive(Debug)]
pub struct Inbox {
    rx: mpsc::Receiver<Message>,
    queued: Arc<AtomicUsize>,
}

impl Outbox {
    /// A new outbox, and the inbox its writer drains.
    pub fn new(limits: QueueLimits) -> (Outbox, Inbox) {
        let (tx, rx) = mpsc::channel(limits.frames);
        let queued = Arc::new(AtomicUsize::new(0));
        let outbox = Outbox {
            tx,
            queued: queued.clone(),
            max_bytes: limits.bytes,
            closer: Arc::new(Closer::default()),
        };
        (outbox, Inbox { rx, queued })
    }

    /// Queues a text frame without waiting. On overflow (frames or bytes) the connection is
    /// closed with 4008 and `false` returned; a connection that is already gone also returns
    /// `false`.
    pub fn push(&self, text: Utf8Bytes) -> bool {
        let len = text.len();
        if self.queued.fetch_add(len, Ordering::AcqRel) + len > self.max_bytes {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            self.overflow();
            return false;
        }
        match self.tx.try_send(Message::Text(text)) {
            Ok(()) => true,
            Err(e) => {
                self.queued.fetch_sub(len, Ordering::AcqRel);
                if matches!(e, mpsc::error::TrySendError::Full(_)) {
                    self.overflow();
                }
                false
            }
        }
    }

    fn overflow(&self) {
        if self.closer.reason().is_none() {
            tracing::warn!("outbound queue full: closing slow client with 4008");
        }
        self.closer.close(Disconnect::Slow);
    }

    /// The connection's close signal.
    pub fn closer(&self) -> &Arc<Closer> {
        &self.closer
    }
}

impl Inbox {
    fn taken(&self, msg: Message) -> Message {
        self.queued.fetch_sub(msg.len(), Ordering::AcqRel);
        msg
    }

    /// The next frame; `None` once every [`Outbox`] is dropped and the queue is empty.
    pub async fn recv(&mut self) -> Option<Message> {
        let msg = self.rx.recv().await?;
        Some(self.taken(msg))
    }

    /// The next frame if one is queued.
    pub fn try_recv(&mut self) -> Option<Message> {
        let msg = self.rx.try_recv().ok()?;
        Some(self.taken(msg))
    }

    /// Refuses further frames; queued ones can still be taken.
    pub fn close(&mut self) {
        self.rx.close();
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
        assert_eq!(out.closer().closed().await, Disconnect::Slow);
        assert_eq!(inbox.recv().await, Some(Message::Text("a".into())));
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
            inbox.queued.load(Ordering::Acquire),
            5,
            "taking a frame releases its bytes"
        );
    }

    #[tokio::test]
    async fn first_close_reason_wins() {
        let (out, _inbox) = Outbox::new(ROOMY);
        out.closer().close(Disconnect::Shutdown);
        out.closer().close(Disconnect::Slow);
        assert_eq!(out.closer().closed().await, Disconnect::Shutdown);
    }
}
