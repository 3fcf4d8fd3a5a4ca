//! The way into one connection: a bounded queue of frames drained by the connection's writer
//! task, and a one-shot close signal.
//!
//! Publishers never wait on a client: [`Outbox::push`] is `try_send`, and a full queue closes
//! the connection with 4008 instead of slowing anyone else down.

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

/// A cloneable handle that queues frames for one connection.
#[derive(Debug, Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Message>,
    closer: Arc<Closer>,
}

impl Outbox {
    /// A new outbox holding at most `capacity` frames, and the receiver its writer drains.
    pub fn new(capacity: usize) -> (Outbox, mpsc::Receiver<Message>) {
        let (tx, rx) = mpsc::channel(capacity);
        (
            Outbox {
                tx,
                closer: Arc::new(Closer::default()),
            },
            rx,
        )
    }

    /// Queues a text frame without waiting. On overflow the connection is closed with 4008
    /// and `false` returned; a connection that is already gone also returns `false`.
    pub fn push(&self, text: Utf8Bytes) -> bool {
        match self.tx.try_send(Message::Text(text)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                if self.closer.reason().is_none() {
                    tracing::warn!("outbound queue full: closing slow client with 4008");
                }
                self.closer.close(Disconnect::Slow);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// The connection's close signal.
    pub fn closer(&self) -> &Arc<Closer> {
        &self.closer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn overflow_closes_with_4008_and_never_blocks() {
        let (out, mut rx) = Outbox::new(2);
        assert!(out.push("a".into()));
        assert!(out.push("b".into()));
        assert!(!out.push("c".into()));
        assert_eq!(out.closer().closed().await, Disconnect::Slow);
        assert_eq!(rx.recv().await, Some(Message::Text("a".into())));
    }

    #[tokio::test]
    async fn first_close_reason_wins() {
        let (out, _rx) = Outbox::new(1);
        out.closer().close(Disconnect::Shutdown);
        out.closer().close(Disconnect::Slow);
        assert_eq!(out.closer().closed().await, Disconnect::Shutdown);
    }
}
