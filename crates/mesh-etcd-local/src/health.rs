use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::Error;

/// Asks etcd's HTTP `/health` endpoint at `client_url` (`http://host:port`) whether the
/// member is healthy: it answers `{"health":"true"}` only when the cluster has a leader
/// and serves reads.
pub fn is_healthy(client_url: &str, timeout: Duration) -> bool {
    request(client_url, "GET", "/health", "", timeout).map(|body| body.contains(r#""health":"true""#)).unwrap_or(false)
}

/// POSTs a JSON body to etcd's JSON gateway (`/v3/kv/put`, `/v3/maintenance/status`, …) at
/// `client_url` and returns the response body. A non-2xx status is an error carrying the body.
pub fn gateway_post(client_url: &str, path: &str, json: &str, timeout: Duration) -> Result<String, Error> {
    request(client_url, "POST", path, json, timeout).map_err(|e| Error::io(format!("POST {client_url}{path}"), e))
}

/// Polls `ready` every 50 ms until it returns true or `timeout` passes; returns whether it did.
pub fn wait_until(timeout: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if ready() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One HTTP/1.1 request with `Connection: close`; returns the body of a 2xx response.
fn request(client_url: &str, method: &str, path: &str, body: &str, timeout: Duration) -> std::io::Result<String> {
    let authority = client_url.strip_prefix("http://").unwrap_or(client_url).trim_end_matches('/');
    let addr = authority
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other(format!("{authority} resolves to no address")))?;
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let raw = String::from_utf8_lossy(&raw);
    let (head, rest) = raw.split_once("\r\n\r\n").ok_or_else(|| std::io::Error::other("truncated HTTP response"))?;
    let status_ok = head.split_whitespace().nth(1).is_some_and(|code| code.starts_with('2'));
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:") && l.to_ascii_lowercase().contains("chunked")
    });
    let body = if chunked { dechunk(rest) } else { rest.to_string() };
    if status_ok {
        Ok(body)
    } else {
        Err(std::io::Error::other(format!("{}: {body}", head.lines().next().unwrap_or("no status line"))))
    }
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        let (Some(chunk), Some(after)) = (tail.get(..n), tail.get(n..)) else {
            break;
        };
        if n == 0 {
            break;
        }
        out.push_str(chunk);
        rest = after.trim_start_matches("\r\n");
    }
    out
}
