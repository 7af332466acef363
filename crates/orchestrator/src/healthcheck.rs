//! `peaqos-orchestrator healthcheck`: the container image's health check.
//! The image has no shell and no curl, so the binary itself asks the
//! server it shares a container with: `GET /ready` on loopback, at the
//! port the same settings give the server. Success is a `200`; anything
//! else (`503` while the database is away, no answer) is a failure.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

use peaqos_protocol::paths;

/// How long the check waits to connect, and then for the answer.
pub const TIMEOUT: Duration = Duration::from_secs(3);

/// A status line longer than this is no HTTP server's.
const MAX_STATUS_LINE: u64 = 1024;

/// Why the server is not healthy. Display is one line.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("cannot reach {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("no answer from {addr}")]
    Read {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} answered {status_line:?}")]
    NotReady {
        path: &'static str,
        status_line: String,
    },
}

/// Where a server listening on `listen` is reached from its own host: a
/// wildcard address (`0.0.0.0`, `::`) through the loopback of its family.
pub fn local_address(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// `GET /ready` at the server listening on `listen`; `Ok` on a `200`.
pub fn check(listen: SocketAddr) -> Result<(), HealthError> {
    let addr = local_address(listen);
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)
        .map_err(|source| HealthError::Connect { addr, source })?;
    let read = |source| HealthError::Read { addr, source };
    stream.set_read_timeout(Some(TIMEOUT)).map_err(read)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(read)?;
    write!(
        stream,
        "GET {} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: peaqos-orchestrator-healthcheck\r\nConnection: close\r\n\r\n",
        paths::READY
    )
    .map_err(read)?;
    let mut status_line = String::new();
    BufReader::new(std::io::Read::take(stream, MAX_STATUS_LINE))
        .read_line(&mut status_line)
        .map_err(read)?;
    let status_line = status_line.trim_end().to_owned();
    if status_line.split(' ').nth(1) == Some("200") {
        Ok(())
    } else {
        Err(HealthError::NotReady {
            path: paths::READY,
            status_line,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;
    use std::net::TcpListener;

    use super::*;

    /// A one-shot server answering `answer` to whatever it is asked; the
    /// request it got comes back through the handle.
    fn serve_once(answer: &'static str) -> (SocketAddr, std::thread::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            // The whole request before answering: closing on unread bytes
            // would reset the connection under the client's read.
            let mut request = Vec::new();
            let mut byte = [0u8; 1];
            while !request.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap() == 1 {
                request.push(byte[0]);
            }
            stream.write_all(answer.as_bytes()).unwrap();
            String::from_utf8_lossy(&request).into_owned()
        });
        (addr, handle)
    }

    #[test]
    fn wildcard_listen_addresses_are_reached_through_loopback() {
        let v4: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        assert_eq!(local_address(v4).to_string(), "127.0.0.1:8080");
        let v6: SocketAddr = "[::]:8080".parse().unwrap();
        assert_eq!(local_address(v6).to_string(), "[::1]:8080");
        let given: SocketAddr = "10.1.2.3:9000".parse().unwrap();
        assert_eq!(local_address(given), given);
    }

    #[test]
    fn ready_is_a_200_to_get_ready_and_anything_else_fails() {
        let (addr, server) = serve_once("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
        check(addr).unwrap();
        assert!(
            server
                .join()
                .unwrap()
                .starts_with("GET /ready HTTP/1.1\r\n")
        );

        let (addr, _server) = serve_once("HTTP/1.1 503 Service Unavailable\r\n\r\n");
        let e = check(addr).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/ready answered \"HTTP/1.1 503 Service Unavailable\""
        );

        // Nothing listening: a port just freed.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let e = check(port).unwrap_err();
        assert_eq!(e.to_string(), format!("cannot reach {port}"));
    }
}
