//! The registry: every configured downstream, its live connections and state, and the catalog
//! built from what the ready ones offer.
//!
//! It is also the supervisor. Each server has one or more replicas (children of a stdio server,
//! or one connection to a remote one); a replica that ends or stops answering pings is started
//! again with doubling waits, and a child that keeps crashing is given up after
//! `max_restarts`. Lazily started servers are woken by their first call and stopped when idle;
//! servers with `isolation = "session"` give each client session its own child. A new config
//! is applied server by server ([`Registry::reload`]), touching only what changed.
//!
//! Events from downstreams (a list changed, a connection ended) are handled by one task that
//! re-lists, rebuilds the catalog and publishes it on a watch channel, which the server sessions
//! follow to tell their clients.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

use crate::maps::DashMap;
use rmcp::model::{ClientRequest, PingRequest, ServerResult};
use rmcp::service::ServiceError;
use tokio::sync::{mpsc, watch};

use crate::breaker::{Breaker, BreakerState};
use crate::bridge::Bridge;
use crate::catalog::{Catalog, Listing};
use crate::config::{
    Config, Isolation, MAX_RESTART_DELAY, ServerName, ServerSpec, StartMode, Transport,
};
use crate::downstream::{CacheHint, ConnectError, Connection, ConnectionId, Event, ListKind};
use crate::relay::Relay;

/// Where a downstream, or one replica of it, stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// `enabled = false` in the config.
    Disabled,
    Starting,
    Ready,
    /// Some of its replicas are ready, the others are not.
    Degraded {
        ready: usize,
        of: usize,
    },
    /// Started lazily and not running now: its next call starts it.
    Idle,
    /// A child that ended or stopped answering, being started again: the attempt, and why.
    Restarting {
        attempt: u32,
        error: String,
    },
    /// A remote server whose connection ended or stopped answering, being reached again.
    Reconnecting {
        attempt: u32,
        error: String,
    },
    /// Ready, but its circuit breaker is open: calls fail at once for a while.
    CircuitOpen {
        retry_in: Duration,
    },
    /// Stopped by conductor: at shutdown, or removed from the config.
    Stopped,
    /// It never came up, or kept crashing; with the last error.
    Failed(String),
    /// A remote server that refused conductor's credentials (401, 403): not tried again
    /// until the config changes.
    Unauthorized(String),
}

impl Status {
    pub fn label(&self) -> &'static str {
        match self {
            Status::Disabled => "disabled",
            Status::Starting => "starting",
            Status::Ready => "ready",
            Status::Degraded { .. } => "degraded",
            Status::Idle => "idle",
            Status::Restarting { .. } => "restarting",
            Status::Reconnecting { .. } => "reconnecting",
            Status::CircuitOpen { .. } => "circuit open",
            Status::Stopped => "stopped",
            Status::Failed(_) => "failed",
            Status::Unauthorized(_) => "failed (unauthorized)",
        }
    }

    /// What goes with the label: the attempt and last error, the replicas ready, the wait.
    pub fn detail(&self) -> Option<String> {
        match self {
            Status::Degraded { ready, of } => Some(format!("{ready} of {of} replicas ready")),
            Status::Restarting { attempt, error } | Status::Reconnecting { attempt, error } => {
                Some(format!("attempt {attempt}: {error}"))
            }
            Status::CircuitOpen { retry_in } => Some(format!(
                "calls fail at once for {}",
                crate::config::format_duration(*retry_in)
            )),
            Status::Failed(error) | Status::Unauthorized(error) => Some(error.clone()),
            _ => None,
        }
    }

    /// Whether calls can be served: now, or by starting it on demand.
    pub fn serves(&self) -> bool {
        matches!(
            self,
            Status::Ready | Status::Degraded { .. } | Status::Idle | Status::CircuitOpen { .. }
        )
    }
}

/// One downstream as the registry shows it.
#[derive(Debug, Clone)]
pub struct ServerState {
    pub spec: Arc<ServerSpec>,
    pub status: Status,
    pub listing: Listing,
    /// How long the connection and first listing took.
    pub startup: Option<Duration>,
    /// The process ids of its running children (stdio servers, shared ones only).
    pub pids: Vec<u32>,
}

/// One configured server inside the registry.
#[derive(Debug)]
struct Slot {
    spec: Arc<ServerSpec>,
    listing: Listing,
    startup: Option<Duration>,
    replicas: Vec<Replica>,
    /// Changes whenever the server is replaced or stopped, so that work begun for an older
    /// incarnation (a restart, a health check) stands down.
    generation: u64,
}

#[derive(Debug)]
struct Replica {
    status: Status,
    connection: Option<Arc<Connection>>,
    /// Restarts in a row without a stable run in between.
    restarts: u32,
    /// When it is tried again, while it waits to be.
    next_try: Option<Instant>,
}

impl Replica {
    fn new(status: Status) -> Self {
        Replica {
            status,
            connection: None,
            restarts: 0,
            next_try: None,
        }
    }
}

impl Slot {
    fn new(spec: Arc<ServerSpec>, generation: u64) -> Self {
        let status = if spec.enabled {
            Status::Starting
        } else {
            Status::Disabled
        };
        let replicas = (0..spec.supervision.replicas)
            .map(|_| Replica::new(status.clone()))
            .collect();
        Slot {
            spec,
            listing: Listing::default(),
            startup: None,
            replicas,
            generation,
        }
    }

    /// The server's status, from its replicas' and its circuit's.
    fn status(&self, circuit: Option<Duration>) -> Status {
        if !self.spec.enabled {
            return Status::Disabled;
        }
        let ready = self
            .replicas
            .iter()
            .filter(|replica| replica.status == Status::Ready)
            .count();
        let of = self.replicas.len();
        match (ready, circuit) {
            (_, Some(retry_in)) if ready > 0 => Status::CircuitOpen { retry_in },
            (ready, _) if ready == of => Status::Ready,
            (ready, _) if ready > 0 => Status::Degraded { ready, of },
            _ => self
                .replicas
                .iter()
                .map(|replica| &replica.status)
                .min_by_key(|status| match status {
                    Status::Restarting { .. } | Status::Reconnecting { .. } => 0,
                    Status::Starting => 1,
                    Status::Idle => 2,
                    Status::Failed(_) | Status::Unauthorized(_) => 3,
                    _ => 4,
                })
                .cloned()
                .unwrap_or(Status::Stopped),
        }
    }

    /// Whether its entries belong in the catalog: it serves now or on demand, or a fallback
    /// serves them while it is down.
    fn offered(&self) -> bool {
        self.spec.enabled
            && (self
                .replicas
                .iter()
                .any(|replica| matches!(replica.status, Status::Ready | Status::Idle))
                || (self.spec.fallback.is_some() && self.listing != Listing::default()))
    }

    /// Take every connection out, marking the replicas stopped.
    fn stop(&mut self) -> Stopping {
        let grace = self.spec.supervision.stop_grace;
        self.replicas
            .iter_mut()
            .filter_map(|replica| {
                replica.status = Status::Stopped;
                replica.connection.take()
            })
            .map(|connection| (connection, grace))
            .collect()
    }
}

/// The live set of downstreams.
#[derive(Debug)]
pub struct Registry {
    config: RwLock<Arc<Config>>,
    servers: DashMap<ServerName, Slot>,
    catalog: watch::Sender<Arc<Catalog>>,
    /// The list-changed notifications servers sent, counted into every catalog published.
    announced: std::sync::Mutex<crate::catalog::Announcements>,
    /// Where connections report what happens to them.
    events: mpsc::UnboundedSender<Event>,
    /// Client requests being served, so shutdown can let them finish.
    in_flight: AtomicUsize,
    /// One circuit per server, shared by every session and workflow.
    breakers: DashMap<ServerName, Breaker>,
    /// One lock per lazily started server, so concurrent first calls start it once.
    waking: DashMap<ServerName, Arc<tokio::sync::Mutex<()>>>,
    /// Client sessions with children of their own, to stop those that idle.
    sessions: DashMap<u64, Weak<Session>>,
    next_generation: AtomicU64,
    /// Where what downstreams send back during requests goes.
    relay: Arc<Relay>,
    bridge: Bridge,
    /// Turns true once every server of the first config has started, or failed to.
    started: watch::Sender<bool>,
    /// When the registry began starting its servers, for `list_wait`.
    launched: Instant,
}

/// Counts one request in flight until dropped.
#[derive(Debug)]
pub struct InFlight<'a>(&'a Registry);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Connections being stopped, each with the grace its server gives it.
type Stopping = Vec<(Arc<Connection>, Duration)>;

/// Stop connections, all at once, each within its grace periods.
async fn close_all(stopping: Stopping) {
    futures::future::join_all(
        stopping
            .iter()
            .map(|(connection, grace)| connection.close(*grace)),
    )
    .await;
}

/// How often idle lazy servers and session children are looked for.
const IDLE_SWEEP: Duration = Duration::from_secs(1);

impl Registry {
    /// Connect to every enabled server at once; return when each is ready or has failed, which
    /// takes at most the slowest server's startup timeout.
    pub async fn start(config: Config) -> Arc<Registry> {
        let registry = Registry::launch(config);
        let _ = registry
            .started
            .subscribe()
            .wait_for(|started| *started)
            .await;
        registry
    }

    /// Start every enabled server in the background, for `serve`: clients are answered at
    /// once, and each server's tools join the catalog (and clients hear `list_changed`) as it
    /// comes up.
    pub fn launch(config: Config) -> Arc<Registry> {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let registry = Arc::new(Registry {
            servers: DashMap::default(),
            catalog: watch::Sender::new(Arc::new(Catalog::default())),
            announced: std::sync::Mutex::default(),
            config: RwLock::new(Arc::new(config)),
            events: events_tx,
            in_flight: AtomicUsize::new(0),
            breakers: DashMap::default(),
            waking: DashMap::default(),
            sessions: DashMap::default(),
            next_generation: AtomicU64::new(1),
            relay: Arc::new(Relay::default()),
            bridge: Bridge::default(),
            started: watch::Sender::new(false),
            launched: Instant::now(),
        });
        let config = registry.config();
        for spec in &config.servers {
            registry.insert(Arc::new(spec.clone()));
        }
        spawn_event_loop(Arc::downgrade(&registry), events_rx);
        spawn_idle_sweep(Arc::downgrade(&registry));
        let starting = registry.clone();
        tokio::spawn(async move {
            let starts = config
                .enabled_servers()
                .map(|spec| starting.start_server(&spec.name));
            futures::future::join_all(starts).await;
            // Each server's outcome was published as it came: a catalog published now would
            // tell clients of servers they listed already.
            starting.started.send_replace(true);
        });
        registry
    }

    /// How much longer a list should wait for servers still starting: `None` once every
    /// server has started, or `list_wait` after launch.
    pub fn list_wait(&self) -> Option<Duration> {
        if *self.started.borrow() {
            return None;
        }
        let left = self
            .config()
            .list_wait
            .saturating_sub(self.launched.elapsed());
        (!left.is_zero()).then_some(left)
    }

    /// The catalog to list from: first waiting, within `list_wait`, for servers still
    /// starting.
    pub async fn catalog_to_list(&self) -> Arc<Catalog> {
        if let Some(wait) = self.list_wait() {
            let mut started = self.started.subscribe();
            let _ = tokio::time::timeout(wait, started.wait_for(|started| *started)).await;
        }
        self.catalog()
    }

    /// Whether a server is starting for the first time.
    pub fn is_starting(&self, server: &ServerName) -> bool {
        self.servers
            .get(server)
            .is_some_and(|slot| slot.status(self.circuit(server)) == Status::Starting)
    }

    /// Wait, at most `within`, until a server that is starting has started or failed to.
    pub async fn started_server(&self, server: &ServerName, within: Duration) {
        let mut changes = self.catalog.subscribe();
        let mut started = self.started.subscribe();
        let deadline = tokio::time::sleep(within);
        tokio::pin!(deadline);
        while self.is_starting(server) {
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                changed = started.changed() => if changed.is_err() { return },
                () = &mut deadline => return,
            }
        }
    }

    /// The config in force.
    pub fn config(&self) -> Arc<Config> {
        match self.config.read() {
            Ok(config) => config.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The current catalog.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.catalog.borrow().clone()
    }

    /// Follow catalog changes.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Catalog>> {
        self.catalog.subscribe()
    }

    /// Where what downstreams send back during requests goes.
    pub fn relay(&self) -> &Relay {
        &self.relay
    }

    /// Calls of 2026-07-28 clients parked between input rounds.
    pub fn bridge(&self) -> &Bridge {
        &self.bridge
    }

    /// A server's spec, if it is configured.
    pub fn spec(&self, server: &ServerName) -> Option<Arc<ServerSpec>> {
        self.servers.get(server).map(|slot| slot.spec.clone())
    }

    /// How long conductor's own list of one kind stays fresh, and for whom: the earliest
    /// expiry and the narrowest scope of the live downstreams that offer that kind. One that
    /// gave no hint leaves conductor's list without one: it promised nothing.
    pub fn cache_hint(&self, kind: ListKind) -> CacheHint {
        let mut merged: Option<CacheHint> = None;
        for slot in self.servers.iter() {
            let connections = slot
                .replicas
                .iter()
                .filter_map(|replica| replica.connection.as_ref());
            for connection in connections.filter(|connection| connection.offers(kind)) {
                let hint = connection.hint(kind);
                merged = Some(merged.map_or(hint, |merged| merged.merge(hint)));
            }
        }
        merged.unwrap_or_default()
    }

    /// The least busy ready connection to a server, if it has one.
    pub fn pick(&self, server: &ServerName) -> Option<Arc<Connection>> {
        let slot = self.servers.get(server)?;
        slot.replicas
            .iter()
            .filter(|replica| replica.status == Status::Ready)
            .filter_map(|replica| replica.connection.as_ref())
            .filter(|connection| connection.is_open())
            .min_by_key(|connection| connection.in_flight())
            .cloned()
    }

    /// A connection to a server for a call: a ready one, or one started now if the server is
    /// lazy and idle. `Err` says why there is none.
    pub async fn connection(
        self: &Arc<Self>,
        server: &ServerName,
    ) -> Result<Arc<Connection>, String> {
        if let Some(connection) = self.pick(server) {
            return Ok(connection);
        }
        let idle = self.servers.get(server).is_some_and(|slot| {
            slot.replicas
                .iter()
                .any(|replica| replica.status == Status::Idle)
        });
        if !idle {
            return Err(self.unavailable_reason(server));
        }
        let lock = self.waking.entry(server.clone()).or_default().clone();
        let _waking = lock.lock().await;
        if let Some(connection) = self.pick(server) {
            return Ok(connection);
        }
        let Some((generation, idle)) = self.servers.get(server).map(|slot| {
            let idle: Vec<usize> = (0..slot.replicas.len())
                .filter(|&index| slot.replicas[index].status == Status::Idle)
                .collect();
            (slot.generation, idle)
        }) else {
            return Err(self.unavailable_reason(server));
        };
        tracing::info!(server = %server, "starting on its first call");
        // `join_all` keeps the opening futures on the heap: every call awaits this function.
        futures::future::join_all(
            idle.into_iter()
                .map(|index| self.open_replica(server, index, generation, Opening::Wake)),
        )
        .await;
        self.pick(server)
            .ok_or_else(|| self.unavailable_reason(server))
    }

    /// A new client session, for servers that give each session its own child.
    pub fn open_session(self: &Arc<Self>) -> Arc<Session> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let session = Arc::new(Session {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            registry: Arc::downgrade(self),
            client: std::sync::OnceLock::new(),
            connections: DashMap::default(),
            opening: tokio::sync::Mutex::new(()),
            log_level: std::sync::Mutex::new(None),
        });
        self.sessions.insert(session.id, Arc::downgrade(&session));
        session
    }

    /// Every server's state, in config order.
    pub fn states(&self) -> Vec<ServerState> {
        self.config()
            .servers
            .iter()
            .filter_map(|spec| {
                let slot = self.servers.get(&spec.name)?;
                Some(ServerState {
                    spec: slot.spec.clone(),
                    status: slot.status(self.circuit(&spec.name)),
                    listing: slot.listing.clone(),
                    startup: slot.startup,
                    pids: slot
                        .replicas
                        .iter()
                        .filter_map(|replica| replica.connection.as_ref()?.pid)
                        .collect(),
                })
            })
            .collect()
    }

    /// Why a server has no connection, for error messages.
    /// The configured server a tool name outside the catalog belongs to by its prefix, when
    /// that server offers nothing now (starting, restarting, reconnecting, failed, disabled):
    /// its tools are missing for that reason, not because the name is wrong.
    pub fn not_offering(&self, public_name: &str) -> Option<ServerName> {
        let config = self.config();
        config
            .servers
            .iter()
            .filter(|spec| unprefixed(spec, &config.separator, public_name).is_some())
            .find(|spec| {
                self.servers
                    .get(&spec.name)
                    .is_none_or(|slot| !slot.offered())
            })
            .map(|spec| spec.name.clone())
    }

    /// The server whose config hides a tool of that public name: a tool it lists, which its
    /// `[servers.NAME.tools]` rules (`allow`, `deny`) do not offer.
    pub fn hiding(&self, public_name: &str) -> Option<ServerName> {
        let config = self.config();
        config.servers.iter().find_map(|spec| {
            let original = unprefixed(spec, &config.separator, public_name)?;
            let slot = self.servers.get(&spec.name)?;
            slot.listing
                .tools
                .iter()
                .any(|tool| tool.name == original)
                .then(|| spec.name.clone())
        })
    }

    pub fn unavailable_reason(&self, server: &ServerName) -> String {
        let Some(status) = self
            .servers
            .get(server)
            .map(|slot| slot.status(self.circuit(server)))
        else {
            return format!("server `{server}` is not configured");
        };
        match status {
            Status::Failed(reason) | Status::Unauthorized(reason) => {
                format!("server `{server}` is down: {reason}")
            }
            Status::Restarting { attempt, error } => format!(
                "server `{server}` is restarting (attempt {attempt}{}) after: {error}",
                self.next_try(server)
            ),
            Status::Reconnecting { attempt, error } => format!(
                "server `{server}` is reconnecting (attempt {attempt}{}): {error}",
                self.next_try(server)
            ),
            status => format!("server `{server}` is {}", status.label()),
        }
    }

    /// When a server waiting to be tried again next is, as words for an error (`, next try in
    /// 1.2s`); nothing when no replica waits.
    fn next_try(&self, server: &ServerName) -> String {
        let soonest = self.servers.get(server).and_then(|slot| {
            slot.replicas
                .iter()
                .filter_map(|replica| replica.next_try)
                .min()
        });
        match soonest {
            Some(at) => format!(
                ", next try in {}",
                crate::config::format_duration(at.saturating_duration_since(Instant::now()))
            ),
            None => String::new(),
        }
    }

    /// May a call go to `server` now? `Err` says how long its open circuit has left.
    pub fn admit(&self, server: &ServerName) -> Result<(), Duration> {
        match self.breakers.get_mut(server) {
            Some(mut breaker) => breaker.admit(tokio::time::Instant::now()),
            None => Ok(()),
        }
    }

    /// An admitted call to `server` ended without an outcome for its circuit (cancelled, or
    /// dropped): see [`Breaker::abandon`].
    pub fn abandon(&self, server: &ServerName) {
        if let Some(mut breaker) = self.breakers.get_mut(server) {
            breaker.abandon(tokio::time::Instant::now());
        }
    }

    /// Record how an admitted call to `server` ended, for its circuit.
    pub fn record(&self, server: &ServerName, transient_failure: bool) {
        if let Some(mut breaker) = self.breakers.get_mut(server) {
            let was_open = !matches!(breaker.state(), BreakerState::Closed { .. });
            breaker.record(transient_failure, tokio::time::Instant::now());
            match (was_open, breaker.state()) {
                (false, BreakerState::Open { .. }) => {
                    tracing::warn!(server = %server, "circuit open: calls fail at once until the cool-down ends")
                }
                (true, BreakerState::Closed { .. }) => {
                    tracing::info!(server = %server, "circuit closed again")
                }
                _ => {}
            }
        }
    }

    /// How long `server`'s open circuit has left (zero while its trial call is out), if open.
    fn circuit(&self, server: &ServerName) -> Option<Duration> {
        let breaker = self.breakers.get(server)?;
        let now = tokio::time::Instant::now();
        match breaker.state() {
            BreakerState::Closed { .. } => None,
            BreakerState::Open { until } if until > now => Some(until - now),
            // Cooled down: the next call is the trial. Until then the server counts as ready,
            // so a readiness probe that keeps traffic away does not keep it out for good.
            BreakerState::Open { .. } => None,
            BreakerState::HalfOpen => Some(Duration::ZERO),
        }
    }

    /// Whether `server`'s circuit is open (or waiting on its trial call).
    pub fn circuit_open(&self, server: &ServerName) -> bool {
        self.circuit(server).is_some()
    }

    /// Count a request in flight while the returned guard lives.
    pub fn track(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self)
    }

    /// Wait until no request is in flight, or `deadline` passes; say which.
    pub async fn drained(&self, deadline: Duration) -> bool {
        let until = Instant::now() + deadline;
        while self.in_flight.load(Ordering::SeqCst) > 0 {
            if Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Stop every downstream, each child with its grace periods to exit by itself.
    pub async fn shutdown(&self) {
        let mut stopping = Vec::new();
        for mut slot in self.servers.iter_mut() {
            slot.generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
            stopping.extend(slot.stop());
        }
        for session in self.live_sessions() {
            stopping.extend(session.take_all());
        }
        close_all(stopping).await;
    }

    /// Apply a new config: servers added are started, removed ones stopped, changed ones
    /// restarted when their process or connection settings changed and updated in place
    /// otherwise; the others are not touched. Clients see the new catalog.
    pub async fn reload(self: &Arc<Self>, new: Config) {
        let old = self.config();
        if old.http_changed(&new) {
            tracing::warn!("`[http]` changes take effect when conductor restarts");
        }
        let mut stopping = Vec::new();
        let mut starting = Vec::new();
        for spec in &old.servers {
            if !new.servers.iter().any(|server| server.name == spec.name)
                && let Some((_, mut slot)) = self.servers.remove(&spec.name)
            {
                tracing::info!(server = %spec.name, "removed from the config: stopping");
                stopping.extend(slot.stop());
                self.breakers.remove(&spec.name);
            }
        }
        for spec in &new.servers {
            let spec = Arc::new(spec.clone());
            let replace = match self.servers.get_mut(&spec.name) {
                None => {
                    tracing::info!(server = %spec.name, "added to the config");
                    true
                }
                Some(slot) if slot.spec.needs_restart(&spec) => {
                    tracing::info!(server = %spec.name, "changed in the config: restarting");
                    true
                }
                Some(mut slot) => {
                    slot.spec = spec.clone();
                    false
                }
            };
            let breaker_changed = self.breakers.get(&spec.name).is_none_or(|breaker| {
                !breaker.has_settings(spec.breaker_failures, spec.breaker_cool_down)
            });
            if breaker_changed {
                self.breakers.insert(
                    spec.name.clone(),
                    Breaker::new(spec.breaker_failures, spec.breaker_cool_down),
                );
            }
            if replace {
                if let Some(mut slot) = self.servers.get_mut(&spec.name) {
                    stopping.extend(slot.stop());
                }
                self.insert(spec.clone());
                if spec.enabled {
                    starting.push(spec.name.clone());
                }
            }
        }
        match self.config.write() {
            Ok(mut config) => *config = Arc::new(new),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(new),
        }
        self.publish();
        let stops = close_all(stopping);
        let starts = futures::future::join_all(starting.iter().map(|name| self.start_server(name)));
        futures::future::join(stops, starts).await;
        self.publish();
    }

    /// Put a server's slot in place (replacing any older one), with its circuit.
    fn insert(&self, spec: Arc<ServerSpec>) {
        self.breakers
            .entry(spec.name.clone())
            .or_insert_with(|| Breaker::new(spec.breaker_failures, spec.breaker_cool_down));
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        self.servers
            .insert(spec.name.clone(), Slot::new(spec, generation));
    }

    /// Start every replica of a server. A lazy server runs once to list what it offers, then
    /// waits idle for its first call.
    async fn start_server(self: &Arc<Self>, server: &ServerName) {
        let Some((generation, replicas, lazy)) = self.servers.get(server).map(|slot| {
            (
                slot.generation,
                slot.replicas.len(),
                slot.spec.supervision.start == StartMode::Lazy,
            )
        }) else {
            return;
        };
        if lazy {
            self.open_replica(server, 0, generation, Opening::ListThenIdle)
                .await;
            return;
        }
        futures::future::join_all(
            (0..replicas).map(|index| self.open_replica(server, index, generation, Opening::First)),
        )
        .await;
    }

    /// Reach a server and list what it offers.
    async fn connect(&self, spec: &ServerSpec) -> Result<(Connection, Listing), ConnectError> {
        let connection =
            Connection::open(spec, self.events.clone(), self.relay.clone(), None).await?;
        let listing = connection.list().await?;
        Ok((connection, listing))
    }

    /// Open one replica and put it in place; say whether it came up.
    async fn open_replica(
        self: &Arc<Self>,
        server: &ServerName,
        index: usize,
        generation: u64,
        opening: Opening,
    ) -> bool {
        let Some(spec) = self.spec(server) else {
            return false;
        };
        let started = Instant::now();
        let outcome = self.connect(&spec).await;
        let elapsed = started.elapsed();
        let Some(mut slot) = self.servers.get_mut(server) else {
            return false;
        };
        if slot.generation != generation {
            return false; // replaced or stopped meanwhile; the connection drops and stops
        }
        if opening != Opening::Wake {
            slot.startup = Some(elapsed);
        }
        let remote = !matches!(spec.transport, Transport::Stdio(_));
        let Some(replica) = slot.replicas.get_mut(index) else {
            return false;
        };
        match outcome {
            Ok((connection, listing)) => {
                tracing::info!(
                    server = %server,
                    replica = index,
                    transport = spec.transport.kind(),
                    pid = connection.pid,
                    tools = listing.tools.len(),
                    prompts = listing.prompts.len(),
                    resources = listing.resources.len() + listing.templates.len(),
                    elapsed_ms = elapsed.as_millis() as u64,
                    "downstream ready"
                );
                let connection = Arc::new(connection);
                if opening == Opening::ListThenIdle {
                    for replica in &mut slot.replicas {
                        replica.status = Status::Idle;
                    }
                    slot.listing = listing;
                    let grace = spec.supervision.stop_grace;
                    drop(slot);
                    tokio::spawn(async move { connection.close(grace).await });
                    self.publish();
                    return true;
                }
                replica.status = Status::Ready;
                replica.next_try = None;
                replica.connection = Some(connection.clone());
                slot.listing = listing;
                drop(slot);
                if !connection.is_open() {
                    // It ended before it was in place, so its own news found nothing to act on.
                    self.lost(server, connection.id, "it ended as it started".to_owned());
                    return false;
                }
                self.watch_health(server, &connection);
                self.renew_subscriptions(server);
                // Its tools join the catalog now, also while other servers still start.
                self.publish();
                true
            }
            // A server that fails to start may come up later (a first `npx -y` download
            // that is slow, a remote server not up yet): tried again as after a crash, with
            // the same backoff and the same `max_restarts` for a child.
            // The same credentials will be refused again: given up at once, and said so.
            Err(error @ ConnectError::Unauthorized(_)) => {
                tracing::error!(server = %server, error = %error, "downstream refused conductor");
                replica.status = Status::Unauthorized(error.to_string());
                drop(slot);
                self.publish();
                false
            }
            Err(error) if opening == Opening::Wake => {
                tracing::error!(server = %server, error = %error, "downstream failed to start");
                replica.status = Status::Failed(error.to_string());
                false
            }
            Err(error) => {
                if opening != Opening::Restart {
                    let what = if remote {
                        "remote server unreachable"
                    } else {
                        "downstream failed to start"
                    };
                    tracing::warn!(server = %server, error = %error, "{what}; trying again with backoff");
                }
                drop(slot);
                self.failed_again(server, index, generation, error.to_string());
                // Calls waiting for it to start learn that it has not.
                self.publish();
                false
            }
        }
    }

    /// A replica's connection ended or stopped answering: fail over to the others, and start
    /// it again unless it has crashed too often in a row.
    fn lost(self: &Arc<Self>, server: &ServerName, connection: ConnectionId, reason: String) {
        let Some(mut slot) = self.servers.get_mut(server) else {
            return;
        };
        let generation = slot.generation;
        let spec = slot.spec.clone();
        let Some(index) = slot.replicas.iter().position(|replica| {
            replica.status == Status::Ready
                && replica
                    .connection
                    .as_ref()
                    .is_some_and(|c| c.id == connection)
        }) else {
            return; // an older connection, or one stopped on purpose
        };
        let replica = &mut slot.replicas[index];
        let Some(old) = replica.connection.take() else {
            return;
        };
        if old.opened.elapsed() >= spec.supervision.stable_after {
            replica.restarts = 0;
        }
        drop(slot);
        tracing::error!(server = %server, replica = index, reason = %reason, "downstream connection ended");
        // Closing kills a child that hangs; one that exited is already gone.
        let grace = spec.supervision.stop_grace;
        tokio::spawn(async move { old.close(grace).await });
        self.failed_again(server, index, generation, reason);
        self.publish();
    }

    /// Count a replica's failure, and restart it after a wait, or give up on a child that
    /// failed `max_restarts` times in a row.
    fn failed_again(
        self: &Arc<Self>,
        server: &ServerName,
        index: usize,
        generation: u64,
        error: String,
    ) {
        let Some(mut slot) = self.servers.get_mut(server) else {
            return;
        };
        if slot.generation != generation {
            return;
        }
        let spec = slot.spec.clone();
        let Some(replica) = slot.replicas.get_mut(index) else {
            return;
        };
        replica.restarts += 1;
        let attempt = replica.restarts;
        let remote = !matches!(spec.transport, Transport::Stdio(_));
        if !remote && attempt > spec.supervision.max_restarts {
            tracing::error!(server = %server, replica = index, restarts = attempt - 1, error = %error, "giving up: it keeps failing");
            replica.status = Status::Failed(format!(
                "gave up after {} restarts in a row; the last: {error}",
                attempt - 1
            ));
            return;
        }
        replica.status = if remote {
            Status::Reconnecting { attempt, error }
        } else {
            Status::Restarting { attempt, error }
        };
        drop(slot);
        tokio::spawn(recover(
            Arc::downgrade(self),
            server.clone(),
            index,
            generation,
        ));
    }

    /// Ping a connection every `ping_interval` while it is in use; one that does not answer
    /// within `ping_timeout` is treated as lost.
    fn watch_health(self: &Arc<Self>, server: &ServerName, connection: &Arc<Connection>) {
        let Some(spec) = self.spec(server) else {
            return;
        };
        let Some(interval) = spec.supervision.ping_interval else {
            return;
        };
        let timeout = spec.supervision.ping_timeout;
        let registry = Arc::downgrade(self);
        let connection = Arc::downgrade(connection);
        let server = server.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let Some(connection) = connection.upgrade() else {
                    return; // stopped or replaced
                };
                if !connection.is_open() {
                    return; // its end is reported by its own event
                }
                let ping = ClientRequest::PingRequest(PingRequest::default());
                let answer =
                    tokio::time::timeout(timeout, connection.peer.send_request(ping)).await;
                if answer.is_ok_and(|answer| answers_a_ping(&answer)) {
                    continue;
                }
                let Some(registry) = registry.upgrade() else {
                    return;
                };
                let reason = format!(
                    "it did not answer a ping within {}",
                    crate::config::format_duration(timeout)
                );
                tracing::warn!(server = %server, pid = connection.pid, "{reason}; marking it unhealthy");
                registry.lost(&server, connection.id, reason);
                return;
            }
        });
    }

    /// A server that restarted or woke knows nothing of what its clients subscribed to:
    /// subscribe it again, through the router like any request to it.
    fn renew_subscriptions(self: &Arc<Self>, server: &ServerName) {
        if self.relay.subscribed_uris(server).is_empty() {
            return;
        }
        let router = crate::router::Router::new(self.clone());
        let server = server.clone();
        tokio::spawn(async move { router.resubscribe(&server).await });
    }

    /// Stop lazily started servers and session children that have not been used for their
    /// `idle_timeout`.
    fn stop_idle(&self) {
        let mut stopping = Vec::new();
        for mut slot in self.servers.iter_mut() {
            let supervision = slot.spec.supervision.clone();
            if supervision.start != StartMode::Lazy {
                continue;
            }
            for replica in &mut slot.replicas {
                let idle = replica.status == Status::Ready
                    && replica.connection.as_ref().is_some_and(|connection| {
                        connection.in_flight() == 0
                            && connection.idle_for() >= supervision.idle_timeout
                    });
                if idle && let Some(connection) = replica.connection.take() {
                    replica.status = Status::Idle;
                    tracing::info!(server = %connection.server, "idle: stopping until its next call");
                    stopping.push((connection, supervision.stop_grace));
                }
            }
        }
        for session in self.live_sessions() {
            stopping.extend(session.take_idle(self));
        }
        if !stopping.is_empty() {
            tokio::spawn(close_all(stopping));
        }
    }

    /// The sessions still open. Collected before use: a session dropped while the map is
    /// locked would deadlock removing itself from it.
    fn live_sessions(&self) -> Vec<Arc<Session>> {
        self.sessions
            .retain(|_, session| session.strong_count() > 0);
        self.sessions
            .iter()
            .filter_map(|session| session.upgrade())
            .collect()
    }

    /// Rebuild the catalog from the servers that serve and publish it.
    fn publish(&self) {
        let config = self.config();
        let slots: Vec<(Arc<ServerSpec>, Listing)> = config
            .servers
            .iter()
            .filter_map(|spec| {
                let slot = self.servers.get(&spec.name)?;
                slot.offered()
                    .then(|| (slot.spec.clone(), slot.listing.clone()))
            })
            .collect();
        let mut catalog = Catalog::build(
            &config.separator,
            slots.iter().map(|(spec, listing)| (&**spec, listing)),
        );
        if let Ok(announced) = self.announced.lock() {
            catalog.announced = *announced;
        }
        catalog.while_starting = self.list_wait().is_some();
        for warning in &catalog.warnings {
            tracing::warn!("{warning}");
        }
        self.catalog.send_replace(Arc::new(catalog));
    }

    async fn handle(self: &Arc<Self>, event: Event) {
        match event {
            Event::ListChanged { server, kind } => {
                self.relist(&server, kind).await;
                // Published even when nothing was re-listed: a call waiting for its clients to
                // be told of the change (`Router::tell_list_changes_first`) waits for this.
                if let Ok(mut announced) = self.announced.lock() {
                    announced.handled += 1;
                }
                self.publish();
            }
            Event::Closed {
                server,
                connection,
                reason,
            } => self.lost(&server, connection, format!("connection ended: {reason}")),
        }
    }

    async fn relist(&self, server: &ServerName, kind: ListKind) {
        let Some(connection) = self.pick(server) else {
            return;
        };
        let mut listing = match self.servers.get(server) {
            Some(slot) => slot.listing.clone(),
            None => return,
        };
        if let Err(error) = connection.list_into(kind, &mut listing).await {
            // A connection that closed meanwhile is reported by its own `Closed` event.
            if connection.is_open() {
                tracing::warn!(server = %server, error = %error, "re-listing after a change failed");
            }
            return;
        }
        let changed = match self.servers.get_mut(server) {
            Some(mut slot) if slot.listing != listing => {
                slot.listing = listing;
                true
            }
            _ => false,
        };
        tracing::info!(server = %server, ?kind, changed, "downstream list changed");
        // Clients are told whether or not the list reads differently now: directly, they
        // would have been.
        if let Ok(mut announced) = self.announced.lock() {
            announced.count(kind);
        }
    }
}

/// Why a replica is being opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Opening {
    /// At startup or after a reload.
    First,
    /// A lazy server at startup: list what it offers, then stop until its first call.
    ListThenIdle,
    /// A lazy server's first call.
    Wake,
    /// After it ended.
    Restart,
}

/// The server's own name a public name stands for under `spec`'s prefix, if it has that
/// prefix (renames aside).
fn unprefixed<'a>(spec: &ServerSpec, separator: &str, public_name: &'a str) -> Option<&'a str> {
    crate::catalog::prefix_of(spec)
        .and_then(|prefix| public_name.strip_prefix(prefix))
        .and_then(|rest| rest.strip_prefix(separator))
}

/// Whether a ping's outcome shows the server alive: any answer does, an error too (servers
/// that dropped `ping`, as 2026-07-28 did, answer -32601). Only silence or a broken
/// connection does not.
fn answers_a_ping(outcome: &Result<ServerResult, ServiceError>) -> bool {
    matches!(
        outcome,
        Ok(_) | Err(ServiceError::McpError(_) | ServiceError::UnexpectedResponse)
    )
}

/// The wait before restart attempt `attempt` (from 1): `first`, doubling, at most
/// [`MAX_RESTART_DELAY`].
pub fn restart_delay(first: Duration, attempt: u32) -> Duration {
    let doublings = attempt.saturating_sub(1).min(16);
    first.saturating_mul(1 << doublings).min(MAX_RESTART_DELAY)
}

/// Sleep before restart attempt `attempt`: between half and all of [`restart_delay`], so that
/// many conductors do not knock on a recovering server all at once.
/// The wait before a restart, jittered so replicas that failed together do not all come back
/// at once.
fn jittered_restart_delay(first: Duration, attempt: u32) -> Duration {
    restart_delay(first, attempt).mul_f64(0.5 + fastrand::f64() / 2.0)
}

/// Start a replica again after it ended, waiting longer after each failure, until it comes up,
/// is given up, or the server is replaced or stopped. Its tools return (with a list-changed
/// notification to clients) when it does.
fn recover(
    registry: Weak<Registry>,
    server: ServerName,
    index: usize,
    generation: u64,
) -> futures::future::BoxFuture<'static, ()> {
    // Boxed: a restart may fail and schedule the next one, a cycle an `async fn` cannot name.
    Box::pin(async move {
        let Some((attempt, delay)) = registry.upgrade().and_then(|registry| {
            let mut slot = registry.servers.get_mut(&server)?;
            let first = slot.spec.supervision.restart_delay;
            let replica = slot.replicas.get_mut(index)?;
            let delay = jittered_restart_delay(first, replica.restarts);
            // For the error of a call meanwhile: when the server is tried again.
            replica.next_try = Some(Instant::now() + delay);
            Some((replica.restarts, delay))
        }) else {
            return;
        };
        tokio::time::sleep(delay).await;
        let Some(registry) = registry.upgrade() else {
            return;
        };
        let current = registry.servers.get(&server).is_some_and(|slot| {
            slot.generation == generation
                && slot.replicas.get(index).is_some_and(|replica| {
                    matches!(
                        replica.status,
                        Status::Restarting { .. } | Status::Reconnecting { .. }
                    )
                })
        });
        if current {
            tracing::info!(server = %server, replica = index, attempt, "starting it again");
            registry
                .open_replica(&server, index, generation, Opening::Restart)
                .await;
        }
    })
}

/// How long a session's new child may take to ask for its client's roots before its first
/// call goes ahead (see [`Session::connection`]).
const ROOTS_GRACE: Duration = Duration::from_millis(300);

/// A client session's own children, for servers with `isolation = "session"`. Dropped with the
/// session, which stops them.
#[derive(Debug)]
pub struct Session {
    id: u64,
    registry: Weak<Registry>,
    /// The session's client, once it has made a request.
    client: std::sync::OnceLock<rmcp::service::Peer<rmcp::service::RoleServer>>,
    connections: DashMap<ServerName, Arc<Connection>>,
    /// One child started at a time, so concurrent first calls share it.
    opening: tokio::sync::Mutex<()>,
    /// The level the client last set with `logging/setLevel`, for 2026-07-28 servers, which
    /// are asked for log messages per request instead.
    #[allow(
        deprecated,
        reason = "logging is deprecated in 2026-07-28; older clients still set levels"
    )]
    log_level: std::sync::Mutex<Option<rmcp::model::LoggingLevel>>,
}

#[allow(
    deprecated,
    reason = "logging is deprecated in 2026-07-28; older clients still set levels"
)]
impl Session {
    pub fn set_log_level(&self, level: rmcp::model::LoggingLevel) {
        if let Ok(mut kept) = self.log_level.lock() {
            *kept = Some(level);
        }
    }

    pub fn log_level(&self) -> Option<rmcp::model::LoggingLevel> {
        self.log_level.lock().ok().and_then(|kept| *kept)
    }

    /// Tells sessions apart, for subscriptions.
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn remember_client(&self, client: &rmcp::service::Peer<rmcp::service::RoleServer>) {
        if self.client.get().is_none() {
            let _ = self.client.set(client.clone());
        }
    }

    /// The session's client, if it has made a request.
    pub fn client(&self) -> Option<rmcp::service::Peer<rmcp::service::RoleServer>> {
        self.client.get().cloned()
    }

    /// This session's own connection to `spec`'s server, started on first use.
    /// `capabilities` are what the calling client declared for the call (a 2026-07-28
    /// client declares them per request), which its child is offered.
    pub async fn connection(
        &self,
        spec: &ServerSpec,
        capabilities: Option<&rmcp::model::ClientCapabilities>,
    ) -> Result<Arc<Connection>, String> {
        debug_assert_eq!(spec.supervision.isolation, Isolation::Session);
        let current = |connections: &DashMap<ServerName, Arc<Connection>>| {
            connections
                .get(&spec.name)
                .map(|connection| connection.clone())
                .filter(|connection| connection.is_open())
        };
        if let Some(connection) = current(&self.connections) {
            return Ok(connection);
        }
        let _opening = self.opening.lock().await;
        if let Some(connection) = current(&self.connections) {
            return Ok(connection);
        }
        let registry = self
            .registry
            .upgrade()
            .ok_or_else(|| "conductor is stopping".to_owned())?;
        let client = self.client().map(|peer| {
            let declared = capabilities
                .cloned()
                .or_else(|| peer.peer_info().map(|info| info.capabilities.clone()))
                .unwrap_or_default();
            (peer, declared)
        });
        // A child offered roots asks for them as it starts, and is answered straight from a
        // client that can be asked outside a call (`DownstreamClient::list_roots`): its first
        // call waits for that answer a little (servers that never ask cost the grace once
        // per child), so the call does not find the child without them.
        let roots_coming = client.as_ref().is_some_and(|(peer, declared)| {
            declared.roots.is_some() && crate::relay::declares_roots(peer)
        });
        // Boxed: opening a connection is a large future, and every call to a session's server
        // awaits this one.
        let connection = Box::pin(Connection::open(
            spec,
            registry.events.clone(),
            registry.relay.clone(),
            client,
        ))
        .await
        .map_err(|error| format!("server `{}`: {error}", spec.name))?;
        tracing::info!(server = %spec.name, session = self.id, pid = connection.pid, "started a child for a session");
        if roots_coming {
            connection.roots_given(ROOTS_GRACE).await;
        }
        let connection = Arc::new(connection);
        self.connections
            .insert(spec.name.clone(), connection.clone());
        Ok(connection)
    }

    /// The session's own connections that are open.
    pub fn connections(&self) -> Vec<Arc<Connection>> {
        self.connections
            .iter()
            .map(|entry| entry.value().clone())
            .filter(|connection| connection.is_open())
            .collect()
    }

    fn take_idle(&self, registry: &Registry) -> Stopping {
        let mut idle = Vec::new();
        self.connections.retain(|server, connection| {
            let Some(spec) = registry.spec(server) else {
                idle.push((connection.clone(), Duration::ZERO));
                return false;
            };
            let keep = connection.in_flight() > 0
                || connection.idle_for() < spec.supervision.idle_timeout;
            if !keep {
                tracing::info!(server = %server, session = self.id, "session child idle: stopping it");
                idle.push((connection.clone(), spec.supervision.stop_grace));
            }
            keep
        });
        idle
    }

    fn take_all(&self) -> Stopping {
        let registry = self.registry.upgrade();
        let all: Vec<_> = self
            .connections
            .iter()
            .map(|entry| {
                let grace = registry
                    .as_ref()
                    .and_then(|registry| registry.spec(entry.key()))
                    .map_or(Duration::ZERO, |spec| spec.supervision.stop_grace);
                (entry.value().clone(), grace)
            })
            .collect();
        self.connections.clear();
        all
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(registry) = self.registry.upgrade() {
            registry.sessions.remove(&self.id);
            let abandoned = registry.relay.end_session(self.id);
            if !abandoned.is_empty()
                && let Ok(runtime) = tokio::runtime::Handle::try_current()
            {
                let router = crate::router::Router::new(registry);
                runtime.spawn(async move { router.unsubscribe_abandoned(abandoned).await });
            }
        }
        let stopping = self.take_all();
        if stopping.is_empty() {
            return;
        }
        tracing::info!(
            session = self.id,
            children = stopping.len(),
            "session ended: stopping its children"
        );
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(close_all(stopping));
        }
    }
}

/// Handle downstream events one at a time, for as long as the registry lives.
fn spawn_event_loop(registry: Weak<Registry>, mut events: mpsc::UnboundedReceiver<Event>) {
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            let Some(registry) = registry.upgrade() else {
                break;
            };
            registry.handle(event).await;
        }
    });
}

fn spawn_idle_sweep(registry: Weak<Registry>) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(IDLE_SWEEP).await;
            let Some(registry) = registry.upgrade() else {
                break;
            };
            registry.stop_idle();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_waits_double_up_to_a_cap() {
        let first = Duration::from_millis(500);
        assert_eq!(restart_delay(first, 1), Duration::from_millis(500));
        assert_eq!(restart_delay(first, 2), Duration::from_secs(1));
        assert_eq!(restart_delay(first, 4), Duration::from_secs(4));
        assert_eq!(restart_delay(first, 7), MAX_RESTART_DELAY);
        assert_eq!(restart_delay(first, u32::MAX), MAX_RESTART_DELAY);
    }

    #[test]
    fn restart_waits_are_jittered_within_their_delay() {
        let first = Duration::from_millis(500);
        for attempt in [1, 3, 10] {
            let delay = restart_delay(first, attempt);
            for _ in 0..20 {
                let waited = jittered_restart_delay(first, attempt);
                assert!(
                    waited >= delay / 2 && waited <= delay,
                    "attempt {attempt}: waited {waited:?} of {delay:?}"
                );
            }
        }
    }
}
