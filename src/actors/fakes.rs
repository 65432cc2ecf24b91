//! Fake cache and database actors for the [`KeyOwner`](crate::actors::key_owner::KeyOwner): they
//! answer the messages the real [`CacheActor`](crate::actors::cache::CacheActor) and
//! [`DbActor`](crate::actors::db::DbActor) answer, from memory, so the owner runs with no Redis
//! and no PostgreSQL. The owner's unit tests and `benches/key_owner.rs` both use them.
//!
//! Compiled only for the lib's own tests and with the `test-fakes` feature (which the package's
//! dev-dependency on itself turns on for benches and integration tests): never in the service.
//!
//! The fakes are actors too: their state is their own, and what the tests want to see of it is
//! counted in shared [`Counter`]s. With no delay set, the fake cache answers within its handler,
//! as fast as an actor can (what the benchmark needs); a delay holds the call in the air, to make
//! concurrent requests meet.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use chrono::Utc;

use crate::actors::cache::{
    CacheDel, CacheError, CacheGet, CacheGetMany, CacheSet, Cached, Claim, ClaimLoad, Fence,
    LeaseExtend, LeaseFill, LeaseRelease, LeaseState, PingCache, Read,
};
use crate::actors::db::{guard_panics, DbError, FetchTemplate, Loaded, PingDb, Standing};
use crate::actors::key_owner::{Generations, KeyOwnerDeps, LeaseDeps, OwnerSettings};
use crate::metrics::Metrics;
use crate::template::{Lookup, Template};

/// The fake database has the templates `1..=ROWS`.
pub const ROWS: i64 = 1000;

/// How many times something happened; clones count together.
#[derive(Debug, Clone, Default)]
pub struct Counter(Arc<AtomicUsize>);

impl Counter {
    /// Counts one more; returns the count before it.
    fn bump(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst)
    }

    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// A template whose content says where it came from (`"query N"`, `"cached"`, ...).
pub fn template(id: i64, content: &str) -> Template {
    Template {
        id,
        name: format!("template {id}"),
        content: content.into(),
        updated_at: Utc::now(),
    }
}

/// A cache that keeps entries in its own map and counts calls.
pub struct FakeCache {
    /// Each value and its soft expiry.
    pub store: HashMap<i64, (Lookup, Instant)>,
    /// Holds every read in the air this long.
    pub get_delay: Duration,
    /// Holds every write in the air this long; it lands (and is counted) afterwards.
    pub set_delay: Duration,
    /// Forgets every write (a Redis that is always empty).
    pub forgetful: bool,
    pub gets: Counter,
    /// Batched reads ([`CacheGetMany`]), one per call.
    pub get_manys: Counter,
    pub sets: Counter,
    pub dels: Counter,
    /// The fleet leases, kept next to the values as Redis keeps them.
    pub leases: FakeLeases,
    /// Each key's generation, bumped by every delete, as Redis keeps it: a write whose fence
    /// names an older one (or none) is counted but not kept.
    pub generations: HashMap<i64, i64>,
}

/// The one Redis epoch of the fake.
const EPOCH: u64 = 1;

/// Fleet leases in memory: each key's holder token and when its lease runs out. A lease held
/// under [`PEER`] stands for another replica's.
#[derive(Default)]
pub struct FakeLeases {
    pub held: HashMap<i64, (String, Instant)>,
    pub ttl: Duration,
    /// Every lease call fails, as with Redis unreachable.
    pub failing: bool,
    pub claims: Counter,
    /// Extension calls, whether or not they extended.
    pub extend_calls: Counter,
    pub extensions: Counter,
    pub fills: Counter,
    pub releases: Counter,
}

/// The token of leases held by "another replica" ([`HoldAsPeer`]).
pub const PEER: &str = "peer";

/// Another replica claims `id`'s lease for `for_`.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct HoldAsPeer {
    pub id: i64,
    pub for_: Duration,
}

/// Another replica fills `id` (a template with `content`, fresh for 30 s) and ends its lease.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct FillAsPeer {
    pub id: i64,
    pub content: &'static str,
}

impl FakeCache {
    /// A cache holding `store`, answering at once.
    pub fn new(store: HashMap<i64, (Lookup, Instant)>) -> Self {
        FakeCache {
            store,
            get_delay: Duration::ZERO,
            set_delay: Duration::ZERO,
            forgetful: false,
            gets: Counter::default(),
            get_manys: Counter::default(),
            sets: Counter::default(),
            dels: Counter::default(),
            leases: FakeLeases {
                ttl: Duration::from_millis(300),
                ..FakeLeases::default()
            },
            generations: HashMap::new(),
        }
    }

    /// The fence a load of `id` that begins now writes under.
    fn fence(&self, id: i64) -> Fence {
        Fence {
            generation: self.generations.get(&id).copied().unwrap_or(0),
            epoch: EPOCH,
        }
    }

    /// A store holding, for each `(id, fresh_for)`, a template body with `content` that is fresh
    /// for `fresh_for` from now.
    pub fn entries(
        ids: impl IntoIterator<Item = (i64, Duration)>,
        content: &str,
    ) -> HashMap<i64, (Lookup, Instant)> {
        let now = Instant::now();
        ids.into_iter()
            .map(|(id, fresh_for)| {
                let body = template(id, content).to_body();
                (id, (Lookup::Found(body), now + fresh_for))
            })
            .collect()
    }

    /// A write lands: counted, and kept unless the cache is forgetful or the key changed since
    /// the load began (its fence is not the key's now).
    fn land(
        &mut self,
        CacheSet {
            id, lookup, fence, ..
        }: CacheSet,
    ) {
        self.sets.bump();
        if !self.forgetful && fence == Some(self.fence(id)) {
            let soft_expiry = Instant::now() + Duration::from_secs(30);
            self.store.insert(id, (lookup, soft_expiry));
        }
    }
}

impl Actor for FakeCache {
    type Context = Context<Self>;
}

impl Handler<CacheGet> for FakeCache {
    type Result = Response<Result<Read, CacheError>>;
    fn handle(&mut self, CacheGet(id): CacheGet, _: &mut Self::Context) -> Self::Result {
        self.gets.bump();
        let value = Read {
            value: self.cached(id),
            fence: self.fence(id),
        };
        let delay = self.get_delay;
        if delay.is_zero() {
            return Response::reply(Ok(value));
        }
        Response::fut(async move {
            tokio::time::sleep(delay).await;
            Ok(value)
        })
    }
}

impl FakeCache {
    fn cached(&self, id: i64) -> Option<Cached> {
        self.store.get(&id).map(|(lookup, soft_expiry)| Cached {
            lookup: lookup.clone(),
            fresh_for: soft_expiry.saturating_duration_since(Instant::now()),
        })
    }
}

impl Handler<CacheGetMany> for FakeCache {
    type Result = Response<Result<Vec<Option<Cached>>, CacheError>>;
    fn handle(&mut self, CacheGetMany(ids): CacheGetMany, _: &mut Self::Context) -> Self::Result {
        self.get_manys.bump();
        let values = ids.iter().map(|&id| self.cached(id)).collect();
        let delay = self.get_delay;
        Response::fut(async move {
            tokio::time::sleep(delay).await;
            Ok(values)
        })
    }
}

impl Handler<CacheSet> for FakeCache {
    type Result = ActorResponse<Self, Result<bool, CacheError>>;
    fn handle(&mut self, msg: CacheSet, _: &mut Self::Context) -> Self::Result {
        let delay = self.set_delay;
        if delay.is_zero() {
            self.land(msg);
            return ActorResponse::reply(Ok(true));
        }
        let write = tokio::time::sleep(delay).into_actor(self);
        ActorResponse::r#async(write.map(move |(), cache, _| {
            cache.land(msg);
            Ok(true)
        }))
    }
}

impl Handler<CacheDel> for FakeCache {
    type Result = ();
    fn handle(&mut self, CacheDel(id): CacheDel, _: &mut Self::Context) {
        self.dels.bump();
        self.store.remove(&id);
        *self.generations.entry(id).or_default() += 1;
    }
}

impl FakeCache {
    /// The token holding `id`'s lease now, if any.
    fn holder(&mut self, id: i64) -> Option<&str> {
        let now = Instant::now();
        self.leases.held.retain(|_, (_, until)| *until > now);
        self.leases.held.get(&id).map(|(token, _)| token.as_str())
    }

    fn lease_failure(&self) -> Option<CacheError> {
        self.leases
            .failing
            .then(|| CacheError::Timeout(Duration::from_millis(50)))
    }
}

impl Handler<ClaimLoad> for FakeCache {
    type Result = Result<Claim, CacheError>;
    fn handle(
        &mut self,
        ClaimLoad { id, token }: ClaimLoad,
        _: &mut Self::Context,
    ) -> Self::Result {
        if let Some(e) = self.lease_failure() {
            return Err(e);
        }
        let value = self.cached(id);
        if value.as_ref().is_some_and(|v| !v.is_soft_expired()) {
            let fence = self.fence(id);
            return Ok(Claim {
                value,
                lease: None,
                fence,
            });
        }
        let now = Instant::now();
        let lease = match self.holder(id) {
            Some(_) => {
                let until = self.leases.held[&id].1;
                LeaseState::Theirs {
                    expires_in: until.saturating_duration_since(now),
                }
            }
            None => {
                self.leases.claims.bump();
                let until = now + self.leases.ttl;
                self.leases.held.insert(id, (token.0, until));
                LeaseState::Ours
            }
        };
        Ok(Claim {
            value,
            lease: Some(lease),
            fence: self.fence(id),
        })
    }
}

impl Handler<LeaseExtend> for FakeCache {
    type Result = Result<bool, CacheError>;
    fn handle(
        &mut self,
        LeaseExtend { id, token }: LeaseExtend,
        _: &mut Self::Context,
    ) -> Self::Result {
        if let Some(e) = self.lease_failure() {
            return Err(e);
        }
        if self.holder(id) != Some(token.0.as_str()) {
            return Ok(false);
        }
        self.leases.extensions.bump();
        let until = Instant::now() + self.leases.ttl;
        self.leases.held.insert(id, (token.0, until));
        Ok(true)
    }
}

impl Handler<LeaseFill> for FakeCache {
    type Result = Result<bool, CacheError>;
    fn handle(&mut self, fill: LeaseFill, _: &mut Self::Context) -> Self::Result {
        if let Some(e) = self.lease_failure() {
            return Err(e);
        }
        if self.holder(fill.id) != Some(fill.token.0.as_str()) {
            return Ok(false);
        }
        self.leases.held.remove(&fill.id);
        self.leases.fills.bump();
        if !self.forgetful {
            let soft_expiry = Instant::now() + Duration::from_secs(30);
            self.store.insert(fill.id, (fill.lookup, soft_expiry));
        }
        Ok(true)
    }
}

impl Handler<LeaseRelease> for FakeCache {
    type Result = ();
    fn handle(&mut self, LeaseRelease { id, token }: LeaseRelease, _: &mut Self::Context) {
        if self.holder(id) == Some(token.0.as_str()) {
            self.leases.held.remove(&id);
            self.leases.releases.bump();
        }
    }
}

impl Handler<HoldAsPeer> for FakeCache {
    type Result = ();
    fn handle(&mut self, HoldAsPeer { id, for_ }: HoldAsPeer, _: &mut Self::Context) {
        let until = Instant::now() + for_;
        self.leases.held.insert(id, (PEER.to_owned(), until));
    }
}

impl Handler<FillAsPeer> for FakeCache {
    type Result = ();
    fn handle(&mut self, FillAsPeer { id, content }: FillAsPeer, _: &mut Self::Context) {
        self.leases.held.remove(&id);
        let body = template(id, content).to_body();
        let soft_expiry = Instant::now() + Duration::from_secs(30);
        self.store.insert(id, (Lookup::Found(body), soft_expiry));
    }
}

/// How the fake database answers.
#[derive(Debug, Clone, Copy)]
pub enum DbMode {
    /// Ids `1..=ROWS` exist.
    Rows,
    /// The first `n` queries fail, later ones succeed.
    FailFirst(usize),
    /// The first `n` queries succeed, later ones fail.
    FailAfter(usize),
    /// Every query panics inside the database call (caught as the real DbActor catches it).
    Panic,
    /// No query ever answers.
    Hang,
}

/// A database that answers each load after a delay, as its [`DbMode`] says, and counts queries.
/// Each answer's content is `"query N"`, N counting from 0, so tests can tell loads apart.
pub struct FakeDb {
    pub mode: DbMode,
    /// Per-id load time; others answer after `default_delay`.
    pub delays: HashMap<i64, Duration>,
    pub default_delay: Duration,
    pub queries: Counter,
}

impl FakeDb {
    pub fn new(mode: DbMode, default_delay: Duration) -> Self {
        FakeDb {
            mode,
            delays: HashMap::new(),
            default_delay,
            queries: Counter::default(),
        }
    }
}

impl Actor for FakeDb {
    type Context = Context<Self>;
}

impl Handler<FetchTemplate> for FakeDb {
    type Result = ResponseFuture<Result<Loaded, DbError>>;
    fn handle(
        &mut self,
        FetchTemplate { id, .. }: FetchTemplate,
        _: &mut Self::Context,
    ) -> Self::Result {
        let n = self.queries.bump();
        let delay = self.delays.get(&id).copied().unwrap_or(self.default_delay);
        let mode = self.mode;
        Box::pin(guard_panics(async move {
            tokio::time::sleep(delay).await;
            match mode {
                DbMode::Panic => panic!("fake database panics while loading {id}"),
                DbMode::Hang => std::future::pending().await,
                DbMode::FailFirst(k) if n < k => Err(DbError::Query("fake failure".into())),
                DbMode::FailAfter(k) if n >= k => Err(DbError::Query("fake failure".into())),
                _ if !(1..=ROWS).contains(&id) => Ok(Loaded::from_primary(None)),
                _ => Ok(Loaded::from_primary(Some(template(
                    id,
                    &format!("query {n}"),
                )))),
            }
        }))
    }
}

/// A fake Redis always answers.
impl Handler<PingCache> for FakeCache {
    type Result = Result<(), CacheError>;
    fn handle(&mut self, _: PingCache, _: &mut Self::Context) -> Self::Result {
        Ok(())
    }
}

/// A fake database is always up.
impl Handler<PingDb> for FakeDb {
    type Result = MessageResult<PingDb>;
    fn handle(&mut self, _: PingDb, _: &mut Self::Context) -> Self::Result {
        MessageResult(Standing::Up)
    }
}

/// The collaborators of an owner whose Redis is `cache` and whose database is `db`, with the
/// fleet lease (through `cache`, leases lasting `lease_ttl`) when it is set: as the service
/// wires an owner, with fakes behind every recipient.
pub fn owner_deps(
    cache: &Addr<FakeCache>,
    db: &Addr<FakeDb>,
    lease_ttl: Option<Duration>,
    settings: OwnerSettings,
    metrics: Metrics,
    generations: Generations,
) -> KeyOwnerDeps {
    KeyOwnerDeps {
        cache_get: cache.clone().recipient(),
        cache_get_many: cache.clone().recipient(),
        cache_set: cache.clone().recipient(),
        cache_del: cache.clone().recipient(),
        db: db.clone().recipient(),
        lease: lease_ttl.map(|ttl| LeaseDeps {
            claim: cache.clone().recipient(),
            extend: cache.clone().recipient(),
            fill: cache.clone().recipient(),
            release: cache.clone().recipient(),
            ttl,
        }),
        settings,
        metrics,
        generations,
    }
}
