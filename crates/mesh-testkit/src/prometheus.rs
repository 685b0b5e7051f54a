//! Scraping a Prometheus endpoint in tests, as Prometheus does: an HTTP GET, then the text
//! format parsed into samples.

use std::collections::BTreeMap;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// GET `path` from `addr` over HTTP/1.1; the status line and the body.
pub async fn http_get(addr: &str, path: &str) -> Option<(String, String)> {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    tcp.write_all(format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\n\r\n").as_bytes()).await.ok()?;
    let mut response = String::new();
    tcp.read_to_string(&mut response).await.ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    Some((head.lines().next()?.to_string(), body.to_string()))
}

/// The samples of a Prometheus text exposition: `name{labels}` → value, comments skipped.
/// Panics on a line that is not `name[{labels}] value`: a scrape that does not parse is a
/// failed test.
pub fn parse(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {l:?}"));
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("not a number in {l:?}"));
            (series.to_string(), value)
        })
        .collect()
}

/// Scrapes `/metrics` at `addr` and parses it.
pub async fn scrape(addr: &str) -> Option<BTreeMap<String, f64>> {
    let (status, body) = http_get(addr, "/metrics").await?;
    status.contains(" 200 ").then(|| parse(&body))
}

/// The value of the series named `name` whose labels include every one of `labels`
/// (written as in the exposition: `code="OK"`).
pub fn value(samples: &BTreeMap<String, f64>, name: &str, labels: &[&str]) -> Option<f64> {
    samples
        .iter()
        .find(|(series, _)| series.split('{').next() == Some(name) && labels.iter().all(|l| series.contains(l)))
        .map(|(_, v)| *v)
}
