//! The websocket writer of one connection: drains its [`Inbox`] into the socket, batching every
//! queued message with `feed` and one `flush` (one syscall for many frames under load), sends
//! websocket pings, and writes the close frame when the connection's [`Closer`] fires. With
//! the reader in [`crate::ws`], the only place that knows websocket frames.

use std::time::Duration;

use futures_util::{Sink, SinkExt};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};

use crate::error::Disconnect;
use crate::outbox::{Closer, Inbox, Next, Text};

/// How long closing may take in all (queued frames, then the close frame) before the socket
/// is dropped.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most frames written between two flushes.
const MAX_BATCH: usize = 64;

/// Runs until every outbox of the connection is dropped or its closer fires; returns the sink
/// so the session can close the socket cleanly.
pub async fn write_loop<K>(
    mut sink: K,
    mut inbox: Inbox,
    closer: std::sync::Arc<Closer>,
    ping_every: Duration,
) -> K
where
    K: Sink<Message, Error = WsError> + Unpin,
{
    let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // One waiter for the whole loop: registering a new one at every wake-up showed up in
    // profiles of fan-out.
    let mut fired = std::pin::pin!(closer.fired());
    let mut closing: Option<Disconnect> = None;
    let reason = loop {
        if closing.is_some() {
            break closing;
        }
        let first = tokio::select! {
            biased;
            _ = &mut fired => break closer.reason(),
            // Before the queue: a steady stream of pushes must not starve keepalive pings
            // (the tick is ready at most once per interval, so it cannot starve the data).
            _ = ping.tick() => Some(Message::Ping(Default::default())),
            next = inbox.next() => match next {
                Some(Next::Frame(text)) => Some(frame(text)),
                // Pongs were charged: a flush writes them and lets their bytes go.
                Some(Next::Flush) => None,
                None => break None,
            },
        };
        let written = {
            let mut batch = std::pin::pin!(async {
                if let Some(first) = first {
                    sink.feed(first).await?;
                    for _ in 1..MAX_BATCH {
                        match inbox.try_recv() {
                            Some(text) => sink.feed(frame(text)).await?,
                            None => break,
                        }
                    }
                }
                // Pongs charged so far were queued in the sink before this flush, so it
                // writes them: their bytes are released once it succeeds.
                let control = inbox.control();
                sink.flush().await.map(|()| control)
            });
            tokio::select! {
                biased;
                _ = &mut fired => {
                    let reason = closer.reason();
                    closing = reason;
                    // A slow client is closed at once; any other close lets this batch finish.
                    if reason.is_some_and(|r| !r.drains_queue()) {
                        break reason;
                    }
                    batch.await
                }
                res = &mut batch => res,
            }
        };
        match written {
            Ok(control) => inbox.release_control(control),
            // The websocket layer's own buffer is full of pongs: as slow as a full queue.
            Err(WsError::WriteBufferFull(_)) => {
                closer.close(Disconnect::Slow);
                break closer.reason();
            }
            Err(_) => break closing,
        }
    };
    let deadline = Instant::now() + CLOSE_TIMEOUT;
    if let Some(reason) = reason {
        if reason.drains_queue() {
            // Replies already queued (e.g. answers to requests finished during shutdown) are
            // still written, but only for half the budget: the close frame must get its turn.
            inbox.close();
            let drain = async {
                while let Some(text) = inbox.try_recv() {
                    sink.feed(frame(text)).await?;
                }
                sink.flush().await
            };
            let _ = tokio::time::timeout(CLOSE_TIMEOUT / 2, drain).await;
        }
        let _ = tokio::time::timeout_at(deadline, sink.send(close_frame(reason))).await;
    }
    let _ = tokio::time::timeout_at(deadline, sink.close()).await;
    sink
}

/// The close frame for `reason`.
fn close_frame(reason: Disconnect) -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::from(reason.code()),
        reason: reason.reason().into(),
    }))
}

/// The text frame carrying `text`.
fn frame(text: Text) -> Message {
    // SAFETY: a `Text` is only ever built from a `String` or a `&str`, so its bytes are UTF-8;
    // checking them again for every recipient of a fan-out would cost a scan per delivery.
    Message::Text(unsafe { Utf8Bytes::from_bytes_unchecked(text.into_bytes()) })
}
