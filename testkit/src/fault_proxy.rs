//! A TCP fault proxy to put between the service and Redis or PostgreSQL.
//!
//! The fault tests need the *real* servers to misbehave the way networks and servers do in an
//! incident — silence, resets, slowness, dropped connections — without stopping the shared test
//! servers that every other test in the process uses. So the service is pointed at a
//! [`FaultProxy`] instead of at the server, and the test flips the proxy's [`Mode`] while the
//! service runs:
//!
//! ```text
//!  service ──TCP──► FaultProxy (127.0.0.1:free port) ──TCP──► real Redis / PostgreSQL
//!                   mode: Pass | Blackhole | Refuse | Latency(d), and cut()
//! ```
//!
//! # Why a thread and a runtime of its own
//!
//! The tests run on actix's single-threaded runtime and spend long stretches driving hundreds of
//! client requests on it. A proxy spawned on that runtime would forward bytes only when the test
//! thread got round to it, adding latency that is not the fault being injected (and would not work
//! at all from a test on another runtime). So [`FaultProxy::start`] starts a plain thread running
//! a current-thread tokio runtime: one core's worth of forwarding is far more than the handful of
//! connections a service keeps to Redis (one per owner shard) or PostgreSQL (its pool) need.
//!
//! # How the mode reaches open connections
//!
//! The mode lives in a [`watch`] channel together with a cut counter. [`FaultProxy::set_mode`] and
//! [`FaultProxy::cut`] update it from the test thread without waiting for the proxy thread: new
//! connections see the change at once (the accept loop reads the mode for each connection), open
//! connections within the time it takes the proxy thread to wake up (well under a millisecond
//! on an idle machine, a few milliseconds on a loaded one). Every connection task watches the
//! channel, so no registry of connections is needed to reach them.
//!
//! # Shutdown
//!
//! Dropping the [`FaultProxy`] marks the state as shut down, which ends the accept loop and resets
//! every open connection; the drop then joins the thread, so when it returns the port is closed
//! and nothing of the proxy is left running.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// What the proxy does to traffic. Applies to new and to open connections alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward bytes both ways as they come.
    Pass,
    /// A network partition: connections are accepted (the kernel completes the handshake) but
    /// nothing is forwarded either way and nothing is ever answered. The client's writes succeed
    /// and its reads wait forever — the case that costs a client its full timeout on every call,
    /// unlike a refusal.
    ///
    /// Bytes sent meanwhile are *held*, not discarded: the proxy stops reading them (they wait in
    /// the socket buffers, at most one chunk per direction in the proxy itself), and a new
    /// connection is not connected upstream at all. Back in [`Mode::Pass`], held bytes are
    /// delivered in order, as TCP retransmission delivers them when a real partition heals.
    /// Discarding them instead would leave the stream with a hole TCP can never produce: the
    /// client's next reply would be matched to a request the server never saw.
    Blackhole,
    /// The server is down: new connections are accepted and reset at once (`SO_LINGER` 0, so the
    /// client sees `ECONNRESET`), and open ones are reset too. Resetting accepted connections
    /// rather than closing the listener keeps the port — and so the service's configured URL —
    /// valid for when the mode changes back.
    Refuse,
    /// A slow network: every chunk read from either side is written to the other side this long
    /// after it was read, in order. Chunks overlap in flight (a chunk does not wait for the
    /// previous one's delay to end before its own starts), so a round trip costs twice the delay,
    /// like a one-way link delay, however the protocol splits its messages into writes.
    Latency(Duration),
}

/// What the connection tasks watch.
#[derive(Debug, Clone, Copy)]
struct State {
    mode: Mode,
    /// Bumped by [`FaultProxy::cut`]: a connection opened under an older value is reset.
    cuts: u64,
    /// Set when the proxy is dropped: stop accepting, reset everything.
    shutdown: bool,
}

impl State {
    /// Must a connection opened when `cuts` was `born` be reset now?
    fn resets(&self, born: u64) -> bool {
        self.shutdown || self.cuts != born || self.mode == Mode::Refuse
    }
}

/// Bytes read per chunk. Small enough to bound what one connection holds in the proxy
/// ([`CHUNKS_IN_FLIGHT`] × this, per direction), large enough that Redis and PostgreSQL replies
/// of a template pass in one chunk.
const CHUNK_BYTES: usize = 16 * 1024;

/// Chunks read but not yet written, per direction. When the writer lags (a long
/// [`Mode::Latency`], a slow peer), the reader stops reading and TCP flow control pushes back on
/// the sender, as a slow link would.
const CHUNKS_IN_FLIGHT: usize = 64;

/// A running proxy to one upstream address. See the module docs.
pub struct FaultProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    state: watch::Sender<State>,
    /// Connections accepted and not yet closed, for tests that check a cut happened.
    open: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Listens on `127.0.0.1` on a free port and forwards to `upstream`, in [`Mode::Pass`].
    ///
    /// The listener is bound here, on the caller's thread, so that the port is known and
    /// accepting when this returns (a service started next cannot race the proxy's start-up).
    ///
    /// # Panics
    ///
    /// If no loopback port can be bound or the proxy thread cannot be started: the test cannot
    /// run without its proxy, and the message says why.
    pub fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .expect("fault proxy: bind 127.0.0.1:0");
        listener
            .set_nonblocking(true)
            .expect("fault proxy: make the listener non-blocking for tokio");
        let addr = listener
            .local_addr()
            .expect("fault proxy: listener address");
        let (state, watcher) = watch::channel(State {
            mode: Mode::Pass,
            cuts: 0,
            shutdown: false,
        });
        let open = Arc::new(AtomicUsize::new(0));
        let thread_open = open.clone();
        let thread = std::thread::Builder::new()
            .name(format!("fault-proxy-{}", addr.port()))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("fault proxy: build its tokio runtime");
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(listener)
                        .expect("fault proxy: hand the listener to tokio");
                    accept_loop(listener, upstream, watcher, thread_open).await;
                });
                // Dropping the runtime here drops every connection task, closing its sockets.
            })
            .expect("fault proxy: spawn its thread");
        FaultProxy {
            addr,
            upstream,
            state,
            open,
            thread: Some(thread),
        }
    }

    /// The port the service should connect to instead of the upstream's.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `127.0.0.1:port()`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where the proxy forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Switches the mode. New connections get it at once; open ones as soon as the proxy thread
    /// runs (see the module docs).
    pub fn set_mode(&self, mode: Mode) {
        self.state.send_modify(|s| s.mode = mode);
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.state.borrow().mode
    }

    /// Resets every open connection now (the client sees `ECONNRESET`), as a server restart, a
    /// failover or a middlebox dropping its state would. The mode is unchanged, so in
    /// [`Mode::Pass`] the client may reconnect at once.
    pub fn cut(&self) {
        self.state.send_modify(|s| s.cuts += 1);
    }

    /// Client connections accepted and not yet closed (held, forwarding or being reset).
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.state.send_modify(|s| s.shutdown = true);
        if let Some(thread) = self.thread.take() {
            // The accept loop ends as soon as it sees the flag; the runtime then drops the
            // connection tasks. Nothing in between blocks, so this join is short.
            let _ = thread.join();
        }
    }
}

/// Accepts until shutdown. A connection arriving in [`Mode::Refuse`] is reset here at once;
/// every other one gets a task of its own.
async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    state: watch::Receiver<State>,
    open: Arc<AtomicUsize>,
) {
    let mut shutdown = state.clone();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            // Err means the sender is gone: the proxy was dropped too.
            _ = shutdown.wait_for(|s| s.shutdown) => return,
        };
        match accepted {
            Ok((client, _peer)) => {
                if state.borrow().mode == Mode::Refuse {
                    reset(client);
                    continue;
                }
                let guard = OpenConnection::new(&open);
                tokio::spawn(serve(client, upstream, state.clone(), guard));
            }
            // Out of file descriptors and the like: transient; back off instead of spinning.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Counts a connection as open for as long as its task lives.
struct OpenConnection(Arc<AtomicUsize>);

impl OpenConnection {
    fn new(open: &Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::SeqCst);
        OpenConnection(open.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Closes `stream` with an RST instead of a FIN: `SO_LINGER` 0 makes `close` discard unsent
/// data and reset the connection, which is what a client sees when a server or a middlebox
/// drops a connection abruptly. Zero linger never blocks in `close`, so this is safe on the
/// runtime thread.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// One client connection, from accept to close.
async fn serve(
    mut client: TcpStream,
    upstream: SocketAddr,
    state: watch::Receiver<State>,
    _open: OpenConnection,
) {
    let born = state.borrow().cuts;
    let mut watcher = state.clone();
    // Resolves when this connection must be reset (cut, Refuse, shutdown or the proxy gone).
    let must_reset = async move {
        let _ = watcher.wait_for(|s| s.resets(born)).await;
    };
    tokio::pin!(must_reset);

    // Under Blackhole nothing reaches the upstream, not even the connection: connect only once
    // the mode lets bytes through.
    let connected = tokio::select! {
        () = &mut must_reset => None,
        connected = connect_when_allowed(upstream, state.clone()) => connected.ok(),
    };
    let Some(mut server) = connected else {
        // The upstream refused (or we were reset meanwhile): the client sees a reset, as it
        // would connecting to a dead server directly.
        reset(client);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);

    let reset_now = {
        let (from_client, to_client) = client.split();
        let (from_server, to_server) = server.split();
        let forwarding = async {
            // An error in either direction (a peer reset, a broken pipe) ends both: a
            // half-working connection helps nobody. A clean EOF ends only its direction, so a
            // half-close is passed on as one.
            tokio::try_join!(
                pump(from_client, to_server, state.clone()),
                pump(from_server, to_client, state.clone()),
            )
        };
        tokio::select! {
            () = &mut must_reset => true,
            _ = forwarding => false,
        }
    };
    if reset_now {
        reset(client);
    }
    // Otherwise both sides are done; dropping the streams closes them normally.
}

/// Connects to the upstream as soon as the mode is not [`Mode::Blackhole`].
async fn connect_when_allowed(
    upstream: SocketAddr,
    mut state: watch::Receiver<State>,
) -> io::Result<TcpStream> {
    state
        .wait_for(|s| s.mode != Mode::Blackhole)
        .await
        .map_err(|_| io::Error::other("fault proxy shut down"))?;
    TcpStream::connect(upstream).await
}

/// Copies one direction until EOF or error, applying the mode to every chunk: no reading and no
/// writing while black-holed, each chunk written at its due time under [`Mode::Latency`].
///
/// Reading and writing are two loops joined by a bounded queue of `(due time, chunk)`, so that
/// chunks are delayed independently (the link-delay model of [`Mode::Latency`]) while staying in
/// order: the writer takes them in the order read and waits for each one's due time.
async fn pump<R, W>(mut from: R, mut to: W, state: watch::Receiver<State>) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (queue, mut queued) = mpsc::channel::<(Instant, Vec<u8>)>(CHUNKS_IN_FLIGHT);
    let mut read_state = state.clone();
    let reading = async move {
        let mut buffer = vec![0u8; CHUNK_BYTES];
        loop {
            // While black-holed, leave the bytes in the socket: they are held, not lost.
            if read_state
                .wait_for(|s| s.mode != Mode::Blackhole)
                .await
                .is_err()
            {
                return Ok(());
            }
            let n = from.read(&mut buffer).await?;
            if n == 0 {
                // EOF: dropping `queue` lets the writer drain and pass the EOF on.
                return Ok(());
            }
            let due = match read_state.borrow().mode {
                Mode::Latency(delay) => Instant::now() + delay,
                _ => Instant::now(),
            };
            if queue.send((due, buffer[..n].to_vec())).await.is_err() {
                return Ok(()); // the writer failed; its error is the one reported
            }
        }
    };
    let mut write_state = state;
    let writing = async move {
        while let Some((due, chunk)) = queued.recv().await {
            tokio::time::sleep_until(due).await;
            // A chunk read before a black-hole began waits for it to end.
            if write_state
                .wait_for(|s| s.mode != Mode::Blackhole)
                .await
                .is_err()
            {
                return Ok(());
            }
            to.write_all(&chunk).await?;
        }
        to.shutdown().await
    };
    tokio::try_join!(reading, writing).map(|_| ())
}

/// The proxy's own behaviour, each mode against a tiny echo server on loopback.
#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on a free loopback port that counts what reaches it, so a test can tell
    /// "the proxy held the bytes" from "the proxy forwarded them and the reply was lost".
    struct Echo {
        addr: SocketAddr,
        accepted: Arc<AtomicUsize>,
        received: Arc<AtomicUsize>,
    }

    async fn echo_server() -> Echo {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let received = Arc::new(AtomicUsize::new(0));
        let (acc, rec) = (accepted.clone(), received.clone());
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                acc.fetch_add(1, Ordering::SeqCst);
                let rec = rec.clone();
                tokio::spawn(async move {
                    let mut buffer = [0u8; 1024];
                    while let Ok(n @ 1..) = socket.read(&mut buffer).await {
                        rec.fetch_add(n, Ordering::SeqCst);
                        if socket.write_all(&buffer[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Echo {
            addr,
            accepted,
            received,
        }
    }

    /// Generous bound for anything that should happen at once on loopback, even on a loaded
    /// 2-core machine.
    const PROMPTLY: Duration = Duration::from_secs(3);
    /// How long "nothing arrives" is watched for.
    const QUIET: Duration = Duration::from_millis(300);

    async fn connect(proxy: &FaultProxy) -> TcpStream {
        tokio::time::timeout(PROMPTLY, TcpStream::connect(proxy.addr()))
            .await
            .expect("connecting to the proxy does not hang")
            .expect("the proxy accepts connections")
    }

    /// Sends `message` and expects it echoed back promptly.
    async fn round_trip(stream: &mut TcpStream, message: &[u8]) {
        stream.write_all(message).await.unwrap();
        let echoed = read_exactly(stream, message.len()).await;
        assert_eq!(echoed, message);
    }

    async fn read_exactly(stream: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut echoed = vec![0u8; n];
        tokio::time::timeout(PROMPTLY, stream.read_exact(&mut echoed))
            .await
            .expect("the echo comes back promptly")
            .expect("the connection stays open");
        echoed
    }

    /// Nothing arrives for [`QUIET`]; the connection is neither closed nor reset either.
    async fn assert_silent(stream: &mut TcpStream) {
        let mut byte = [0u8; 1];
        match tokio::time::timeout(QUIET, stream.read(&mut byte)).await {
            Err(_elapsed) => {}
            Ok(read) => panic!("expected silence, got {read:?}"),
        }
    }

    /// The next read fails with `ECONNRESET`, promptly.
    async fn assert_reset(stream: &mut TcpStream) {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(PROMPTLY, stream.read(&mut byte))
            .await
            .expect("the reset arrives promptly");
        match read {
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}"),
            Ok(n) => panic!("expected a reset, read {n} bytes"),
        }
    }

    #[tokio::test]
    async fn pass_forwards_both_ways_and_counts_open_connections() {
        let echo = echo_server().await;
        let proxy = FaultProxy::start(echo.addr);
        assert_eq!(proxy.upstream(), echo.addr);
        assert_eq!(proxy.addr().port(), proxy.port());
        let mut a = connect(&proxy).await;
        let mut b = connect(&proxy).await;
        round_trip(&mut a, b"hello").await;
        round_trip(&mut b, b"world").await;
        assert_eq!(proxy.open_connections(), 2);
        assert_eq!(echo.accepted.load(Ordering::SeqCst), 2);
        assert_eq!(echo.received.load(Ordering::SeqCst), 10);

        // A client's close is passed on and the connection is forgotten.
        drop(a);
        drop(b);
        let started = std::time::Instant::now();
        while proxy.open_connections() > 0 {
            assert!(started.elapsed() < PROMPTLY, "closed connections linger");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn blackhole_answers_nothing_forwards_nothing_and_delivers_held_bytes_after() {
        let echo = echo_server().await;
        let proxy = FaultProxy::start(echo.addr);
        let mut open = connect(&proxy).await;
        round_trip(&mut open, b"before").await;

        proxy.set_mode(Mode::Blackhole);
        assert_eq!(proxy.mode(), Mode::Blackhole);
        // Give the open connection's reader time to see the mode before the write.
        tokio::time::sleep(Duration::from_millis(50)).await;
        open.write_all(b"held").await.expect("writes still succeed");
        assert_silent(&mut open).await;
        let mut new = connect(&proxy).await;
        new.write_all(b"new").await.expect("writes still succeed");
        assert_silent(&mut new).await;
        assert_eq!(
            echo.received.load(Ordering::SeqCst),
            6,
            "nothing reached the server"
        );
        assert_eq!(
            echo.accepted.load(Ordering::SeqCst),
            1,
            "the new connection was not even connected upstream"
        );

        proxy.set_mode(Mode::Pass);
        assert_eq!(read_exactly(&mut open, 4).await, b"held");
        assert_eq!(read_exactly(&mut new, 3).await, b"new");
        round_trip(&mut new, b"after").await;
    }

    #[tokio::test]
    async fn refuse_resets_new_and_open_connections_until_pass() {
        let echo = echo_server().await;
        let proxy = FaultProxy::start(echo.addr);
        let mut open = connect(&proxy).await;
        round_trip(&mut open, b"before").await;

        proxy.set_mode(Mode::Refuse);
        assert_reset(&mut open).await;
        // The reset may beat the end of the handshake (connect itself fails) or follow it (the
        // first read fails): either way the connection is reset, never served.
        match tokio::time::timeout(PROMPTLY, TcpStream::connect(proxy.addr()))
            .await
            .expect("connecting does not hang")
        {
            Ok(mut refused) => assert_reset(&mut refused).await,
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}"),
        }
        assert_eq!(echo.accepted.load(Ordering::SeqCst), 1);

        proxy.set_mode(Mode::Pass);
        let mut again = connect(&proxy).await;
        round_trip(&mut again, b"after").await;
    }

    #[tokio::test]
    async fn latency_delays_each_direction() {
        let echo = echo_server().await;
        let proxy = FaultProxy::start(echo.addr);
        let mut stream = connect(&proxy).await;
        round_trip(&mut stream, b"warm").await;

        let delay = Duration::from_millis(150);
        proxy.set_mode(Mode::Latency(delay));
        // Two chunks sent back to back overlap in flight: both arrive one round trip later,
        // not two.
        let started = std::time::Instant::now();
        stream.write_all(b"slow").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        stream.write_all(b"ly").await.unwrap();
        let echoed = read_exactly(&mut stream, 6).await;
        let took = started.elapsed();
        assert_eq!(echoed, b"slowly");
        assert!(
            took >= 2 * delay,
            "a round trip pays the delay each way: took {took:?}"
        );

        proxy.set_mode(Mode::Pass);
        round_trip(&mut stream, b"fast").await;
    }

    #[tokio::test]
    async fn cut_resets_open_connections_and_keeps_the_mode() {
        let echo = echo_server().await;
        let proxy = FaultProxy::start(echo.addr);
        let mut first = connect(&proxy).await;
        let mut second = connect(&proxy).await;
        round_trip(&mut first, b"one").await;
        round_trip(&mut second, b"two").await;

        proxy.cut();
        assert_reset(&mut first).await;
        assert_reset(&mut second).await;
        assert_eq!(proxy.mode(), Mode::Pass);
        let mut fresh = connect(&proxy).await;
        round_trip(&mut fresh, b"three").await;
    }

    #[tokio::test]
    async fn drop_closes_the_port_and_every_connection() {
        let echo = echo_server().await;
        let proxy = FaultProxy::start(echo.addr);
        let addr = proxy.addr();
        let mut open = connect(&proxy).await;
        round_trip(&mut open, b"x").await;

        drop(proxy);
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(PROMPTLY, open.read(&mut byte))
            .await
            .expect("the connection ends promptly");
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "the connection is closed: {read:?}"
        );
        let refused = TcpStream::connect(addr).await;
        assert!(refused.is_err(), "nothing listens on {addr} any more");
    }
}
