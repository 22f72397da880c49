//! `flowserve healthcheck`: one HTTP GET of the readiness route of a server on this host,
//! for a container's HEALTHCHECK (the image has no curl). Exit 0 on 200, 1 otherwise.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Where to probe.
#[derive(Debug, clap::Args)]
pub struct HealthcheckArgs {
    /// Host of the server.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port of the server (the serving port's environment twin).
    #[arg(long, env = "FLOWSERVE_PORT", default_value_t = 8080)]
    pub port: u16,
    /// Route to GET.
    #[arg(long, default_value = "/readyz")]
    pub path: String,
    /// Give up after this long.
    #[arg(long, default_value_t = 2000)]
    pub timeout_ms: u64,
}

/// The HTTP status the route answers.
pub fn probe(args: &HealthcheckArgs) -> Result<u16, String> {
    let timeout = Duration::from_millis(args.timeout_ms.max(1));
    let addr = (args.host.as_str(), args.port)
        .to_socket_addrs()
        .map_err(|e| format!("{}:{}: {e}", args.host, args.port))?
        .next()
        .ok_or_else(|| format!("{}:{}: no address", args.host, args.port))?;
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{addr}: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}:{}\r\nConnection: close\r\n\r\n",
        args.path, args.host, args.port
    );
    s.write_all(req.as_bytes())
        .map_err(|e| format!("{addr}: {e}"))?;
    let mut head = [0u8; 64];
    let n = s.read(&mut head).map_err(|e| format!("{addr}: {e}"))?;
    let line = String::from_utf8_lossy(&head[..n]);
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{addr}: not an HTTP response: {line:?}"))
}
