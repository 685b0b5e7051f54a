use std::time::Duration;

use anyhow::{Context as _, bail};
use mesh_balancer::{BalancerConfig, Endpoint, EndpointSet, Strategy};
use mesh_discovery::EtcdResolver;
use mesh_etcd::{Etcd, EtcdOptions};
use mesh_tls::ClientTls;
use tonic::transport::{Channel, Endpoint as TonicEndpoint};

use super::{Client, Resilience};

/// How long connecting to a target may take before it counts as unreachable.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Connects to one target such as `http://127.0.0.1:50051` with a plain tonic `Channel`
/// (no balancer); the error names the address.
pub async fn connect(target: &str) -> anyhow::Result<Channel> {
    let url = url_of(target)?;
    TonicEndpoint::from_shared(url.clone())
        .with_context(|| format!("invalid --target {target:?}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("cannot reach {url}"))
}

/// Like [`connect`], over TLS with `tls` (`host:port` then means `https://host:port`):
/// one connection to one server, for health checks and tools.
pub async fn connect_tls(target: &str, tls: Option<ClientTls>) -> anyhow::Result<Channel> {
    let Some(tls) = tls else { return connect(target).await };
    let url = tls_url_of(target, true)?;
    let uri: http::Uri = url.parse().with_context(|| format!("invalid --target {target:?}"))?;
    let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_string();
    let port = uri.port_u16().unwrap_or(443);
    let plain = format!("http://{}", uri.authority().map_or("", |a| a.as_str()));
    let connector = tower::service_fn(move |_: http::Uri| {
        let (tls, host) = (tls.clone(), host.clone());
        async move {
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls.connect(tcp, &host).await?))
        }
    });
    TonicEndpoint::from_shared(plain)
        .with_context(|| format!("invalid --target {target:?}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect_with_connector(connector)
        .await
        .with_context(|| format!("cannot reach {url}"))
}

/// The client stack for `service` over a static list of targets (`--target a,b,c`), with
/// optional weights; waits until the targets have been probed and one is reachable. With
/// `tls`, targets are dialled over TLS (`host:port` means `https://host:port`).
pub async fn balanced(
    service: &str,
    targets: &[String],
    weights: &[u32],
    strategy: Strategy,
    resilience: &Resilience,
    tls: Option<ClientTls>,
) -> anyhow::Result<Client> {
    if targets.is_empty() {
        bail!("--target needs at least one address");
    }
    if !weights.is_empty() && weights.len() != targets.len() {
        bail!("--weights has {} values for {} targets; give one per target", weights.len(), targets.len());
    }
    let mut endpoints = Vec::with_capacity(targets.len());
    for (i, target) in targets.iter().enumerate() {
        let url = tls_url_of(target, tls.is_some())?;
        let address = url.strip_prefix("http://").unwrap_or(&url).to_string();
        endpoints.push(Endpoint::new(address).with_weight(weights.get(i).copied().unwrap_or(1)));
    }
    let mut config = BalancerConfig::new(service).with_strategy(strategy);
    config.tls = tls;
    let mesh = Client::spawn(config, resilience, tokio_stream::once(EndpointSet::new(endpoints)))?;
    ready(mesh, || format!("cannot reach {service} at {}", targets.join(","))).await
}

/// Waits until `mesh` reaches a server; the error is `what`, with why each server could
/// not be used: refused, timed out, or a TLS handshake that failed.
async fn ready(mesh: Client, what: impl FnOnce() -> String) -> anyhow::Result<Client> {
    let Err(e) = mesh.balanced.wait_ready(CONNECT_TIMEOUT).await else { return Ok(mesh) };
    let why: Vec<String> = mesh
        .balanced
        .endpoints()
        .into_iter()
        .filter_map(|s| s.last_error.map(|why| format!("{}: {why}", s.address)))
        .collect();
    let detail = if why.is_empty() { String::new() } else { format!(" ({})", why.join("; ")) };
    Err(anyhow::Error::new(e).context(format!("{}{detail}", what())))
}

/// The client stack over the servers of `service` registered in etcd; waits for the first
/// listing and for one reachable server.
pub async fn discovered(
    etcd: &str,
    root: &str,
    service: &str,
    strategy: Strategy,
    resilience: &Resilience,
    tls: Option<ClientTls>,
) -> anyhow::Result<Client> {
    let options = EtcdOptions::parse_endpoints(etcd).with_context(|| format!("invalid --etcd {etcd:?}"))?;
    discovered_through(Etcd::new(options), root, service, strategy, resilience, tls).await
}

/// [`discovered`] through an etcd handle the caller also uses (say, for configuration).
/// With `tls`, only servers registered as speaking TLS are called, over TLS; without it,
/// only those that are not.
pub async fn discovered_through(
    etcd: Etcd,
    root: &str,
    service: &str,
    strategy: Strategy,
    resilience: &Resilience,
    tls: Option<ClientTls>,
) -> anyhow::Result<Client> {
    let endpoints = etcd.endpoints();
    let resolver = EtcdResolver::new(etcd, root, service);
    let prefix = resolver.prefix().to_string();
    let resolution = resolver.spawn();
    let Some(listed) = resolution.wait_listed(DISCOVERY_TIMEOUT).await else {
        // Why etcd did not list: refused credentials, permissions, or no answer at all.
        let why = resolution.status().borrow().view.as_ref().and_then(|v| v.last_error.clone());
        match why {
            Some(why) if !why.contains("unavailable") && !why.contains("no answer") => {
                bail!("cannot discover {service} in etcd at {endpoints}: {why}")
            }
            _ => bail!(
                "cannot discover {service}: no answer from etcd at {endpoints} within {DISCOVERY_TIMEOUT:?} \
                 (start a local one with `cargo xtask etcd-up`, or give --target)"
            ),
        }
    };
    if listed.is_empty() {
        bail!("no servers of {service} are registered in etcd at {endpoints} (under {prefix})");
    }
    let mut config = BalancerConfig::new(service).with_strategy(strategy);
    config.tls = tls;
    let mut mesh = Client::spawn(config, resilience, resolution.updates())?;
    mesh.discovery = Some(resolution.status());
    ready(mesh, || format!("cannot reach any of the {} servers of {service} registered in etcd", listed.len())).await
}

/// How long the first listing from etcd may take.
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(3);

/// The URL of a target for a client with TLS settings (`tls`) or without: `host:port`
/// takes the client's scheme; a URL must agree with it.
pub(crate) fn tls_url_of(target: &str, tls: bool) -> anyhow::Result<String> {
    let t = target.trim();
    if !tls {
        if t.starts_with("https://") {
            bail!("--target {t:?} speaks TLS: give --tls-ca (the CA that signed its certificate)");
        }
        return url_of(t);
    }
    if t.starts_with("http://") {
        bail!(
            "--target {t:?} is plaintext, and a client with --tls-ca sends calls over TLS only; give https:// or host:port"
        );
    }
    let bare = t.strip_prefix("https://").unwrap_or(t);
    let url = url_of(bare)?;
    Ok(format!("https://{}", url.trim_start_matches("http://")))
}

/// `http://host:port` for `host:port` or a URL; anything else is a readable error.
pub(crate) fn url_of(target: &str) -> anyhow::Result<String> {
    let target = target.trim();
    let url = if target.contains("://") { target.to_string() } else { format!("http://{target}") };
    let uri: http::Uri =
        url.parse().with_context(|| format!("invalid --target {target:?}; expected host:port or http://host:port"))?;
    if uri.scheme_str() == Some("https") {
        bail!("--target {target:?} speaks TLS: give --tls-ca (the CA that signed its certificate)");
    }
    if uri.scheme_str() != Some("http") {
        bail!("invalid --target {target:?}: expected host:port, http:// or, with --tls-ca, https://");
    }
    if uri.port_u16().is_none() || uri.host().is_none_or(str::is_empty) {
        bail!("invalid --target {target:?}; expected host:port or http://host:port");
    }
    Ok(url)
}
