//! How a cache actor reaches Redis: one server, a Redis Cluster, or the master that Redis
//! Sentinel names, and which Redis that is (its *epoch*).
//!
//! | settings | topology | connection |
//! |---|---|---|
//! | `REDIS_URL` naming one server | single | a `ConnectionManager`, which reconnects by itself |
//! | `REDIS_URL` naming any node of a cluster | cluster, found out by `INFO cluster` on connecting | redis-rs's async cluster client: slots discovered, `MOVED`/`ASK` followed |
//! | `REDIS_URL` listing several URLs, comma-separated | cluster, with these seed nodes | the same |
//! | `REDIS_SENTINELS` and `REDIS_SENTINEL_MASTER` | sentinel | a `ConnectionManager` to the master the sentinels name (checked with `ROLE`), asked again after a failover |
//!
//! Connecting is asynchronous ([`connect`]); the actor asks for it at start and again whenever
//! its breaker opens or a write meets a replica (`READONLY`: a failover moved the master), so a
//! failover or a slot move costs at most one breaker period, never a restart.
//!
//! # Epochs
//! Redis replication is asynchronous: a promoted replica may lack the master's last writes, and
//! a restarted Redis (no persistence) has lost them all. The *epoch* is a fingerprint of the run
//! ids of the masters the service writes to (`INFO server`'s `run_id`, which a restart or a
//! promotion changes and nothing sets back). Each entry records the epoch its load began in, and
//! one from another epoch is a miss (see [`super::Fence`]): after a failover nothing the old
//! master acknowledged is trusted, and no generation that went back can make an old fill look
//! current.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo};
use redis::sentinel::{SentinelClientBuilder, SentinelServerType};
use redis::{Cmd, ConnectionAddr, IntoConnectionInfo, Pipeline, RedisFuture, TlsMode, Value};

use super::{CacheError, CacheSettings};

/// Where the service finds Redis, from its settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topology {
    /// One URL: a single server, or any node of a cluster (told apart on connecting).
    Url(String),
    /// Several URLs: seed nodes of a cluster.
    Cluster(Vec<String>),
    /// Sentinels (`host:port` or URLs) and the name of the master they watch; `template` is
    /// `REDIS_URL`, whose user, password, database and scheme (TLS) reach the master.
    Sentinel {
        sentinels: Vec<String>,
        master: String,
        template: String,
    },
}

impl Topology {
    pub fn from_settings(redis_url: &str, sentinels: &[String], master: &str) -> Topology {
        if !sentinels.is_empty() {
            return Topology::Sentinel {
                sentinels: sentinels.to_vec(),
                master: master.to_owned(),
                template: redis_url.to_owned(),
            };
        }
        let urls: Vec<String> = redis_url
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(str::to_owned)
            .collect();
        match urls.as_slice() {
            [one] => Topology::Url(one.clone()),
            _ => Topology::Cluster(urls),
        }
    }

    /// The URL whose settings (database, credentials, TLS) apply to the nodes: the first.
    pub fn first_url(&self) -> &str {
        match self {
            Topology::Url(url) => url,
            Topology::Cluster(urls) => urls.first().map_or("", String::as_str),
            Topology::Sentinel { template, .. } => template,
        }
    }
}

/// A connection to whatever Redis the topology names; clones share it.
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    pub fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(conn) => conn.req_packed_command(cmd),
            Conn::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(conn) => conn.get_db(),
            Conn::Cluster(conn) => conn.get_db(),
        }
    }
}

/// A connection and the epoch of the Redis it reaches.
#[derive(Clone)]
pub struct Linked {
    pub conn: Conn,
    pub epoch: u64,
}

/// Connects as the topology says, and reads the epoch. Bounded by the caller.
pub async fn connect(settings: &CacheSettings) -> Result<Linked, CacheError> {
    let timeout = settings.timeout;
    let redis = |e: redis::RedisError| CacheError::from_redis(e, timeout);
    let mut conn = match &settings.topology {
        Topology::Url(_) => {
            let client = super::client(settings).map_err(redis)?;
            let mut single = ConnectionManager::new_with_config(client, manager_config(settings))
                .await
                .map_err(redis)?;
            if is_cluster_node(&mut single).await.map_err(redis)? {
                log::info!("REDIS_URL names a node of a Redis Cluster: using the cluster");
                cluster(settings, &[settings.topology.first_url().to_owned()]).await?
            } else {
                Conn::Single(single)
            }
        }
        Topology::Cluster(urls) => cluster(settings, urls).await?,
        Topology::Sentinel {
            sentinels,
            master,
            template,
        } => {
            let client = sentinel_master(settings, sentinels, master, template).await?;
            let single = ConnectionManager::new_with_config(client, manager_config(settings))
                .await
                .map_err(redis)?;
            Conn::Single(single)
        }
    };
    let epoch = epoch(&mut conn, timeout).await?;
    Ok(Linked { conn, epoch })
}

/// Whether the Redis behind `conn` is a node of a Redis Cluster (`INFO cluster`).
async fn is_cluster_node(conn: &mut impl ConnectionLike) -> redis::RedisResult<bool> {
    let info: String = redis::cmd("INFO").arg("cluster").query_async(conn).await?;
    Ok(info.lines().any(|l| l.trim_end() == "cluster_enabled:1"))
}

/// Where lease notices are subscribed to: one Redis (a single server, or the master the
/// sentinels name now), or a cluster's every node.
pub enum NoticeTarget {
    Single(Box<redis::Client>),
    Cluster(Vec<String>),
}

/// Finds out where to subscribe, as [`connect`] finds out where to send commands.
pub async fn notice_target(settings: &CacheSettings) -> Result<NoticeTarget, CacheError> {
    let timeout = settings.timeout;
    let redis = |e: redis::RedisError| CacheError::from_redis(e, timeout);
    match &settings.topology {
        Topology::Url(url) => {
            let client = super::client(settings).map_err(redis)?;
            let mut conn = client
                .get_multiplexed_async_connection()
                .await
                .map_err(redis)?;
            if is_cluster_node(&mut conn).await.map_err(redis)? {
                Ok(NoticeTarget::Cluster(vec![url.clone()]))
            } else {
                Ok(NoticeTarget::Single(Box::new(client)))
            }
        }
        Topology::Cluster(urls) => Ok(NoticeTarget::Cluster(urls.clone())),
        Topology::Sentinel {
            sentinels,
            master,
            template,
        } => sentinel_master(settings, sentinels, master, template)
            .await
            .map(|client| NoticeTarget::Single(Box::new(client))),
    }
}

/// A cluster connection whose pushes (shard channel messages, disconnections) go to `pushes`.
pub async fn notice_cluster(
    settings: &CacheSettings,
    seeds: Vec<String>,
    pushes: tokio::sync::mpsc::UnboundedSender<redis::PushInfo>,
) -> Result<ClusterConnection, CacheError> {
    let timeout = settings.timeout;
    let mut builder = ClusterClientBuilder::new(seeds)
        .connection_timeout(connect_timeout(settings))
        .response_timeout(connect_timeout(settings))
        .use_protocol(redis::ProtocolVersion::RESP3)
        .push_sender(pushes);
    if let Some(tls) = &settings.redis_tls {
        builder = builder.certs(tls.clone());
    }
    let client = builder
        .build()
        .map_err(|e| CacheError::from_redis(e, timeout))?;
    client
        .get_async_connection()
        .await
        .map_err(|e| CacheError::from_redis(e, timeout))
}

fn manager_config(settings: &CacheSettings) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_response_timeout(Some(settings.timeout))
        // Connecting may take a little longer than a command, but a black-holed Redis must not
        // hold a reconnect for seconds.
        .set_connection_timeout(Some(connect_timeout(settings)))
        .set_number_of_retries(1)
        .set_min_delay(Duration::from_millis(10))
        .set_max_delay(Duration::from_millis(500))
}

fn connect_timeout(settings: &CacheSettings) -> Duration {
    settings.timeout.max(Duration::from_millis(100))
}

async fn cluster(settings: &CacheSettings, urls: &[String]) -> Result<Conn, CacheError> {
    let timeout = settings.timeout;
    let mut builder = ClusterClientBuilder::new(urls.to_vec())
        .connection_timeout(connect_timeout(settings))
        .response_timeout(timeout)
        // A slot on the move answers MOVED or ASK (or TRYAGAIN for a multi-key command during
        // the move): followed at once, and retried a few times within the call's timeout.
        .retries(4)
        .min_retry_wait(5)
        .max_retry_wait(50);
    if let Some(tls) = &settings.redis_tls {
        builder = builder.certs(tls.clone());
    }
    let client = builder
        .build()
        .map_err(|e| CacheError::from_redis(e, timeout))?;
    let conn = client
        .get_async_connection()
        .await
        .map_err(|e| CacheError::from_redis(e, timeout))?;
    Ok(Conn::Cluster(conn))
}

/// A client for the master that the sentinels name for `master` (redis-rs checks its `ROLE`).
pub(crate) async fn sentinel_master(
    settings: &CacheSettings,
    sentinels: &[String],
    master: &str,
    template: &str,
) -> Result<redis::Client, CacheError> {
    let timeout = settings.timeout;
    let redis = |e: redis::RedisError| CacheError::from_redis(e, timeout);
    let mut addrs = Vec::with_capacity(sentinels.len());
    let mut sentinel_auth = None;
    for sentinel in sentinels {
        let (addr, auth) = sentinel_addr(sentinel).map_err(CacheError::Protocol)?;
        addrs.push(addr);
        sentinel_auth = sentinel_auth.or(auth);
    }
    let info = template.into_connection_info().map_err(redis)?;
    let tls = matches!(info.addr(), ConnectionAddr::TcpTls { .. });
    let mut builder = SentinelClientBuilder::new(addrs, master, SentinelServerType::Master)
        .map_err(redis)?
        .set_client_to_redis_db(info.redis_settings().db());
    if let Some(user) = info.redis_settings().username() {
        builder = builder.set_client_to_redis_username(user);
    }
    if let Some(password) = info.redis_settings().password() {
        builder = builder.set_client_to_redis_password(password);
    }
    if tls {
        builder = builder.set_client_to_redis_tls_mode(TlsMode::Secure);
        if let Some(certs) = &settings.redis_tls {
            builder = builder.set_client_to_redis_certificates(certs.clone());
        }
    }
    if let Some((user, password, sentinel_tls)) = sentinel_auth {
        if let Some(user) = user {
            builder = builder.set_client_to_sentinel_username(user);
        }
        if let Some(password) = password {
            builder = builder.set_client_to_sentinel_password(password);
        }
        if sentinel_tls {
            builder = builder.set_client_to_sentinel_tls_mode(TlsMode::Secure);
            if let Some(certs) = &settings.redis_tls {
                builder = builder.set_client_to_sentinel_certificates(certs.clone());
            }
        }
    }
    let mut client = builder.build().map_err(redis)?;
    client.async_get_client().await.map_err(redis)
}

/// A sentinel's address from `host:port` or a `redis://`/`rediss://` URL, with the URL's
/// credentials and whether it is TLS (`None` for a plain `host:port`).
type SentinelAuth = (Option<String>, Option<String>, bool);

pub fn sentinel_addr(text: &str) -> Result<(ConnectionAddr, Option<SentinelAuth>), String> {
    if text.contains("://") {
        let info = text
            .into_connection_info()
            .map_err(|e| format!("{text:?} is not a sentinel URL: {e}"))?;
        let tls = matches!(info.addr(), ConnectionAddr::TcpTls { .. });
        let settings = info.redis_settings();
        let auth = (
            settings.username().map(str::to_owned),
            settings.password().map(str::to_owned),
            tls,
        );
        return Ok((info.addr().clone(), Some(auth)));
    }
    let (host, port) = text
        .rsplit_once(':')
        .ok_or_else(|| format!("{text:?} is not host:port"))?;
    let port = port
        .parse()
        .map_err(|_| format!("{text:?}: the port is not a number from 1 to 65535"))?;
    if host.is_empty() || port == 0 {
        return Err(format!("{text:?} is not host:port"));
    }
    Ok((ConnectionAddr::Tcp(host.to_owned(), port), None))
}

/// The epoch of the Redis `conn` reaches: a fingerprint of its masters' run ids.
pub async fn epoch(conn: &mut Conn, timeout: Duration) -> Result<u64, CacheError> {
    let mut info = redis::cmd("INFO");
    info.arg("server");
    let reply: Value = match conn {
        Conn::Single(single) => single.req_packed_command(&info).await,
        Conn::Cluster(cluster) => {
            let masters = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
            cluster.route_command(info, masters).await
        }
    }
    .map_err(|e| CacheError::from_redis(e, timeout))?;
    let mut run_ids = Vec::new();
    collect_run_ids(&reply, &mut run_ids);
    if run_ids.is_empty() {
        return Err(CacheError::Protocol("INFO server named no run_id".into()));
    }
    Ok(fingerprint(run_ids))
}

/// Every `run_id:` line in the reply (one server's text, or a cluster's map of them).
fn collect_run_ids(reply: &Value, into: &mut Vec<String>) {
    let mut text = |bytes: &[u8]| {
        for line in String::from_utf8_lossy(bytes).lines() {
            if let Some(id) = line.trim_end().strip_prefix("run_id:") {
                into.push(id.to_owned());
            }
        }
    };
    match reply {
        Value::BulkString(bytes) => text(bytes),
        Value::VerbatimString { text: t, .. } => text(t.as_bytes()),
        Value::SimpleString(t) => text(t.as_bytes()),
        Value::Array(items) | Value::Set(items) => {
            items.iter().for_each(|v| collect_run_ids(v, into));
        }
        Value::Map(pairs) => pairs.iter().for_each(|(_, v)| collect_run_ids(v, into)),
        _ => {}
    }
}

/// One number for a set of run ids, whatever their order; never 0 (which means "unknown").
fn fingerprint(mut run_ids: Vec<String>) -> u64 {
    run_ids.sort();
    run_ids.dedup();
    let mut hasher = DefaultHasher::new();
    run_ids.hash(&mut hasher);
    hasher.finish().max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_url_a_list_or_sentinels() {
        assert_eq!(
            Topology::from_settings("redis://a:1/", &[], "m"),
            Topology::Url("redis://a:1/".into())
        );
        assert_eq!(
            Topology::from_settings("redis://a:1, redis://b:2,", &[], "m"),
            Topology::Cluster(vec!["redis://a:1".into(), "redis://b:2".into()])
        );
        let sentinels = vec!["s1:26379".to_owned()];
        assert!(matches!(
            Topology::from_settings("rediss://:pw@x/2", &sentinels, "main"),
            Topology::Sentinel { master, .. } if master == "main"
        ));
    }

    #[test]
    fn sentinel_addresses_as_host_port_or_url() {
        let (addr, auth) = sentinel_addr("10.0.0.5:26379").unwrap();
        assert_eq!(addr, ConnectionAddr::Tcp("10.0.0.5".into(), 26379));
        assert!(auth.is_none());
        let (_, auth) = sentinel_addr("redis://:secret@s1:26379").unwrap();
        assert_eq!(auth, Some((None, Some("secret".into()), false)));
        for bad in ["s1", "s1:", ":26379", "s1:99999", "s1:0"] {
            assert!(sentinel_addr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_epoch_is_the_set_of_run_ids() {
        let info = |id: &str| Value::BulkString(format!("# Server\r\nrun_id:{id}\r\n").into());
        let mut one = Vec::new();
        collect_run_ids(&info("aa"), &mut one);
        assert_eq!(one, ["aa"]);
        let map = Value::Map(vec![
            (Value::SimpleString("n2".into()), info("bb")),
            (Value::SimpleString("n1".into()), info("aa")),
        ]);
        let mut two = Vec::new();
        collect_run_ids(&map, &mut two);
        assert_eq!(
            fingerprint(two),
            fingerprint(vec!["aa".into(), "bb".into()])
        );
        assert_ne!(
            fingerprint(vec!["aa".into()]),
            fingerprint(vec!["ab".into()])
        );
    }
}
