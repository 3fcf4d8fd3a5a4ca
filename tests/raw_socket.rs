//! Clients that misbehave below the websocket library: a raw TCP socket that writes frames by
//! hand and reads (or refuses to read) the server's bytes itself. These are the cases a
//! well-behaved client library cannot produce: a burst of thousands of frames in one write,
//! and a client that pings without ever reading.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{Instant, timeout};

/// A websocket client over a bare socket.
struct RawClient {
    stream: TcpStream,
    /// Bytes read past the last parsed frame.
    buf: Vec<u8>,
}

const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

impl RawClient {
    /// Connects, optionally with a tiny receive buffer so the server's writes back up at
    /// once, and completes the handshake.
    async fn connect(bridge: &Bridge, recv_buffer: Option<u32>) -> RawClient {
        let socket = TcpSocket::new_v4().unwrap();
        if let Some(size) = recv_buffer {
            socket.set_recv_buffer_size(size).unwrap();
        }
        let mut stream = socket.connect(bridge.addr).await.unwrap();
        let request = format!(
            "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            bridge.addr
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut client = RawClient {
            stream,
            buf: Vec::new(),
        };
        let end = loop {
            if let Some(i) = client.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            client.fill().await.expect("the handshake is answered");
        };
        let head = String::from_utf8_lossy(&client.buf[..end]).to_string();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        client.buf.drain(..end);
        client
    }

    /// Reads more bytes into the buffer.
    async fn fill(&mut self) -> std::io::Result<()> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// The next frame from the server: opcode and payload.
    async fn frame(&mut self) -> std::io::Result<(u8, Vec<u8>)> {
        loop {
            if let Some((opcode, payload, used)) = parse_frame(&self.buf) {
                self.buf.drain(..used);
                return Ok((opcode, payload));
            }
            self.fill().await?;
        }
    }

    /// Reads frames until a close frame and returns its code, counting pongs on the way. An
    /// I/O error (a reset) before the close frame fails the test.
    async fn close_code(&mut self) -> (u16, usize) {
        let mut pongs = 0;
        loop {
            match timeout(Duration::from_secs(15), self.frame()).await {
                Ok(Ok((OP_CLOSE, payload))) => {
                    assert!(payload.len() >= 2, "a close frame with a code");
                    return (u16::from_be_bytes([payload[0], payload[1]]), pongs);
                }
                Ok(Ok((OP_PONG, _))) => pongs += 1,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    panic!("the connection failed before the close frame ({pongs} pongs read): {e}")
                }
                Err(_) => panic!("no close frame in time ({pongs} pongs read)"),
            }
        }
    }
}

/// A masked client frame (the mask key is zero, which leaves the payload as it is).
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mut frame = vec![0x80 | opcode, 0x80 | payload.len() as u8, 0, 0, 0, 0];
    frame.extend_from_slice(payload);
    frame
}

/// Parses one unmasked server frame at the start of `buf`: opcode, payload, bytes used.
fn parse_frame(buf: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let opcode = buf[0] & 0x0F;
    let (len, header) = match buf[1] & 0x7F {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 if buf.len() >= 10 => (
            u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
            10,
        ),
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    (buf.len() >= header + len).then(|| (opcode, buf[header..header + len].to_vec(), header + len))
}

#[tokio::test]
async fn a_burst_flood_reads_the_4029_close_frame_rather_than_a_reset() {
    let bridge = Bridge::start("{}", None, |c| {
        c.rate_per_sec = 10.0;
        c.rate_burst = 50;
    })
    .await;
    let mut client = RawClient::connect(&bridge, None).await;
    let (opcode, hello) = client.frame().await.unwrap();
    assert_eq!(opcode, 0x1);
    assert!(String::from_utf8_lossy(&hello).contains("@@patchbay/CONNECTED"));

    // 5,000 pings in one write: far beyond the burst, so the server closes with 4029 while
    // most of them are still unread in its socket.
    let burst: Vec<u8> = (0..5000).flat_map(|_| client_frame(OP_PING, b"")).collect();
    client.stream.write_all(&burst).await.unwrap();
    let (code, pongs) = client.close_code().await;
    assert_eq!(code, 4029, "after {pongs} pongs");
    assert!(pongs < 5000, "the server stopped answering once it closed");
    // Then the server ends the connection in an orderly way.
    let end = timeout(Duration::from_secs(5), client.frame()).await;
    match end {
        Ok(Err(e)) => assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}"),
        other => panic!("expected the end of the stream, got {other:?}"),
    }
}

#[tokio::test]
async fn pongs_to_a_client_that_never_reads_count_against_the_send_queue() {
    let bridge = Bridge::start("{}", None, |c| {
        c.rate_per_sec = 1_000_000.0;
        c.rate_burst = 1_000_000;
        c.send_queue_bytes = 64 * 1024;
    })
    .await;
    let mut client = RawClient::connect(&bridge, Some(4096)).await;
    assert_eq!(bridge.app.lifecycle.connections(), 1);

    // Pings with the largest payload a control frame may carry, and never a read. Without a
    // bound the server would buffer every pong; with it, the pongs fill the 64 KiB queue and
    // the connection is closed as a slow reader. Written in chunks, stopping once the server
    // stops reading.
    let ping = client_frame(OP_PING, &[b'p'; 125]);
    let chunk: Vec<u8> = (0..256).flat_map(|_| ping.clone()).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut sent = 0usize;
    while sent < 64 * 1024 * 1024 && Instant::now() < deadline {
        match timeout(Duration::from_millis(500), client.stream.write_all(&chunk)).await {
            Ok(Ok(())) => sent += chunk.len(),
            // The server stopped reading (it closed us) or went away: enough.
            _ => break,
        }
        if bridge.app.lifecycle.connections() == 0 {
            break;
        }
    }
    // Reading now, the client finds every pong the kernel held, then the 4008 close frame.
    let (code, pongs) = client.close_code().await;
    assert_eq!(
        code, 4008,
        "after {pongs} pongs ({sent} bytes of pings sent)"
    );
    let closed_by = Instant::now() + Duration::from_secs(20);
    while bridge.app.lifecycle.connections() > 0 {
        assert!(Instant::now() < closed_by, "the connection ends");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = bridge.app.metrics.render();
    assert!(
        metrics.contains(r#"patchbay_disconnects_total{reason="slow"} 1"#),
        "closed as a slow client:\n{metrics}"
    );
}
