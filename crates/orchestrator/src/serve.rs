//! Accepting connections and serving HTTP/1.1 on them: what `axum::serve`
//! does, plus the limits it cannot be given.
//!
//! `axum::serve` sets no timer on hyper, so a connection that sends part of
//! its headers, or nothing, stays open for ever (the request timeout only
//! starts once the headers are complete), and it accepts until the process
//! runs out of descriptors. Under `prlimit --nofile=1024`, 1,100 silent
//! connections made every new request time out. Here:
//! - a connection has `header_timeout` to send a request's headers, counted
//!   from its first poll, so that a silent connection and an idle keep-alive
//!   one are closed alike;
//! - at most `max_connections` are served at once, below the descriptor
//!   limit (raised to the hard limit at start), so that the database pool,
//!   the MCR client and the log always have descriptors; beyond it the
//!   listener stops accepting, and the kernel's backlog holds newcomers until
//!   a slot frees;
//! - a connection whose socket has taken nothing for `write_timeout` while
//!   an answer waits to be written (a client that stopped reading, most
//!   often an event-stream subscriber) is told so through [`WriteStall`]
//!   (the stream ends with `too_slow`, if the socket still takes it), and
//!   closed [`STALL_GRACE`] later with a reset, which frees at once the
//!   kernel's send buffer (megabytes on a fast link) that a normal close
//!   would keep for an unreading peer for as long as the kernel probes it;
//! - shutdown stops accepting, lets each connection finish its request, and
//!   returns once every connection has closed.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Request};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

/// Descriptors kept for everything that is not a client connection: the
/// database pool, the MCR client, the registry file, the log, the listener.
const RESERVED_DESCRIPTORS: u64 = 128;
/// Headers a request may carry before hyper refuses it without our envelope.
/// The edge's own, lower limit answers in the envelope (`http::limits`).
pub const HYPER_MAX_HEADERS: usize = 256;

/// How long a stalled connection has, once told, to take its last words
/// (an event stream's `too_slow`) before it is reset.
pub const STALL_GRACE: Duration = Duration::from_secs(1);

/// The connection limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_timeout: Duration,
    pub max_connections: usize,
    /// Longest a write may wait for the socket to take anything.
    pub write_timeout: Duration,
}

/// Each request's view of its connection's writes. Its token is cancelled
/// once the socket has taken nothing for the write timeout; the
/// connection is reset [`STALL_GRACE`] later, whatever the request does.
#[derive(Debug, Clone, Default)]
pub struct WriteStall {
    token: CancellationToken,
    /// A send buffer asked for by the request, in bytes (0: the kernel's).
    send_buffer: Arc<AtomicUsize>,
}

impl WriteStall {
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Caps the kernel's send buffer of this connection at about `bytes`
    /// from its next write: for a long-lived answer (an event stream),
    /// whose unread part the kernel would otherwise hold up to its
    /// autotuned maximum (megabytes on a fast link) before a write blocks
    /// and the write deadline can start.
    pub fn limit_send_buffer(&self, bytes: usize) {
        self.send_buffer.store(bytes, Ordering::Relaxed);
    }
}

/// A client connection whose writes have a deadline; see the module
/// documentation.
struct DeadlineIo {
    inner: TcpStream,
    timeout: Duration,
    stall: WriteStall,
    /// Armed while a write waits for the socket; disarmed when it takes
    /// anything.
    timer: Option<Pin<Box<Sleep>>>,
    /// The send buffer set, if any.
    send_buffer: usize,
}

impl DeadlineIo {
    /// A write that could not proceed: arms the deadline, and on its expiry
    /// tells the request and makes the eventual close a reset (`SO_LINGER`
    /// 0: the kernel drops what the client never read instead of holding
    /// it for an orphaned socket).
    fn blocked<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        if self.stall.token.is_cancelled() {
            return Poll::Pending;
        }
        let timeout = self.timeout;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if timer.as_mut().poll(cx).is_ready() {
            self.timer = None;
            let _ = self.inner.set_zero_linger();
            self.stall.token.cancel();
        }
        Poll::Pending
    }

    fn apply_send_buffer(&mut self) {
        let wanted = self.stall.send_buffer.load(Ordering::Relaxed);
        if wanted != self.send_buffer {
            self.send_buffer = wanted;
            // Linux doubles the value for its bookkeeping; and stops
            // autotuning this socket's buffer.
            if let Err(e) = rustix::net::sockopt::set_socket_send_buffer_size(&self.inner, wanted) {
                tracing::debug!(error = %e, "cannot set a connection's send buffer");
            }
        }
    }

    /// The socket took `n` bytes (`Ok(0)` and errors say nothing of a
    /// draining peer).
    fn wrote(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match polled {
            Poll::Pending => self.blocked(cx),
            Poll::Ready(Ok(n)) if n > 0 => {
                self.timer = None;
                Poll::Ready(Ok(n))
            }
            ready @ Poll::Ready(_) => ready,
        }
    }
}

impl AsyncRead for DeadlineIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for DeadlineIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.apply_send_buffer();
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.wrote(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.apply_send_buffer();
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Pending => self.blocked(cx),
            ready @ Poll::Ready(_) => ready,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Raises the soft limit on open descriptors to the hard limit (the
/// default soft limit, 1,024, is far below what a server needs; systemd's
/// hard limit is 524,288) and returns how many connections fit under it.
/// `configured` is lowered to fit, with a warning.
pub fn connection_cap(configured: Option<u32>) -> usize {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limits = getrlimit(Resource::Nofile);
    let mut soft = limits.current.unwrap_or(u64::MAX);
    if let Some(hard) = limits.maximum
        && hard > soft
    {
        match setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(hard),
                maximum: Some(hard),
            },
        ) {
            Ok(()) => soft = hard,
            Err(e) => tracing::warn!(
                error = %e,
                soft,
                hard,
                "cannot raise the open-file limit to its hard limit"
            ),
        }
    }
    let fits = usize::try_from(soft.saturating_sub(RESERVED_DESCRIPTORS).max(16))
        .unwrap_or(usize::MAX)
        // Also bounds the semaphore, whose permits are counted in u32 at
        // shutdown.
        .min(u32::MAX as usize >> 1);
    match configured.map(|n| n as usize) {
        Some(n) if n > fits => {
            tracing::warn!(
                configured = n,
                fits,
                open_file_limit = soft,
                "PEAQOS_MAX_CONNECTIONS is above what the open-file limit allows; using the lower"
            );
            fits
        }
        Some(n) => n.max(1),
        None => fits,
    }
}

/// Serves `router` on `listener` until `shutdown` completes, then waits for
/// every connection to finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let stop = CancellationToken::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_headers(HYPER_MAX_HEADERS);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            biased;
            () = &mut shutdown => break,
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (stream, remote) = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(&e).await;
                    continue;
                }
            },
        };
        // Requests and answers are small; do not wait for Nagle.
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let stall = WriteStall::default();
        let io = DeadlineIo {
            inner: stream,
            timeout: limits.write_timeout,
            stall: stall.clone(),
            timer: None,
            send_buffer: 0,
        };
        let request_stall = stall.clone();
        let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(remote));
            req.extensions_mut().insert(request_stall.clone());
            router.clone().oneshot(req)
        });
        let conn = http.serve_connection(TokioIo::new(io), service);
        let stop = stop.clone();
        tokio::spawn(async move {
            let _permit = permit;
            tokio::pin!(conn);
            let served = tokio::select! {
                served = conn.as_mut() => served,
                () = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    tokio::select! {
                        served = conn.as_mut() => served,
                        () = stalled(&stall) => return,
                    }
                }
                // Dropping the connection closes its socket, with a reset.
                () = stalled(&stall) => {
                    tracing::debug!(client = %remote, "connection closed: it took nothing for the write timeout");
                    return;
                }
            };
            if let Err(e) = served {
                // A client that went away or never sent its headers: its
                // business, not an operator's.
                tracing::debug!(client = %remote, error = %e, "connection closed");
            }
        });
    }
    stop.cancel();
    // Each connection holds a permit until it ends: all permits back means
    // every connection has closed.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = permits.acquire_many(all).await;
}

/// Completes [`STALL_GRACE`] after the connection stalled.
async fn stalled(stall: &WriteStall) {
    stall.token.cancelled().await;
    tokio::time::sleep(STALL_GRACE).await;
}

/// What to do when `accept` fails: a connection that was reset before it
/// was accepted is nobody's problem; anything else (out of descriptors, of
/// memory) is said and waited out briefly instead of spinning.
async fn accept_failed(e: &std::io::Error) {
    use std::io::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::ConnectionRefused
    ) {
        return;
    }
    tracing::warn!(error = %e, "cannot accept a connection; retrying in 100 ms");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configured_cap_is_kept_when_it_fits_and_lowered_when_it_does_not() {
        assert_eq!(connection_cap(Some(10)), 10);
        let fits = connection_cap(None);
        assert!(fits >= 16);
        assert_eq!(connection_cap(Some(u32::MAX)), fits);
    }

    /// The default soft limit (1,024) would cap a server at a few hundred
    /// clients: start-up raises it to the hard limit.
    #[test]
    fn the_open_file_soft_limit_is_raised_to_the_hard_limit() {
        use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
        let before = getrlimit(Resource::Nofile);
        let Some(hard) = before.maximum.filter(|h| *h > 900) else {
            return;
        };
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(900),
                maximum: Some(hard),
            },
        )
        .unwrap();
        let cap = connection_cap(None);
        assert_eq!(getrlimit(Resource::Nofile).current, Some(hard));
        assert_eq!(
            cap as u64,
            (hard - RESERVED_DESCRIPTORS).min(u64::from(u32::MAX >> 1))
        );
    }
}
