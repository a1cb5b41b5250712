//! The registry: every configured downstream, its live connection and state, and the catalog
//! built from what the ready ones offer.
//!
//! Connections open concurrently. Events from downstreams (a list changed, a connection ended)
//! are handled by one task that re-lists, rebuilds the catalog and publishes it on a watch
//! channel, which the server sessions follow to tell their clients.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::breaker::{Breaker, BreakerState};
use crate::catalog::{Catalog, Listing};
use crate::config::{Config, ServerName, ServerSpec};
use crate::downstream::{Connection, Event, ListKind};

/// How long a child gets to exit on its own before it is killed, at shutdown.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Where a downstream stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// `enabled = false` in the config.
    Disabled,
    Starting,
    Ready,
    /// It never came up, or its connection ended; with the reason.
    Failed(String),
    /// A remote server whose connection ended, being reached again: the attempt, and why the
    /// last one failed.
    Reconnecting {
        attempt: u32,
        error: String,
    },
    /// Stopped by conductor, at shutdown.
    Stopped,
}

impl Status {
    pub fn label(&self) -> &'static str {
        match self {
            Status::Disabled => "disabled",
            Status::Starting => "starting",
            Status::Ready => "ready",
            Status::Failed(_) => "failed",
            Status::Reconnecting { .. } => "reconnecting",
            Status::Stopped => "stopped",
        }
    }
}

/// One downstream as the registry knows it.
#[derive(Debug, Clone)]
pub struct ServerState {
    pub spec: ServerSpec,
    pub status: Status,
    pub connection: Option<Arc<Connection>>,
    pub listing: Listing,
    /// How long the connection and first listing took.
    pub startup: Option<Duration>,
}

/// The live set of downstreams.
#[derive(Debug)]
pub struct Registry {
    config: Config,
    servers: DashMap<ServerName, ServerState>,
    catalog: watch::Sender<Arc<Catalog>>,
    /// Where connections report what happens to them.
    events: mpsc::UnboundedSender<Event>,
    /// Client requests being served, so shutdown can let them finish.
    in_flight: std::sync::atomic::AtomicUsize,
    /// One circuit per server, shared by every session and workflow.
    breakers: DashMap<ServerName, Breaker>,
}

/// Counts one request in flight until dropped.
#[derive(Debug)]
pub struct InFlight<'a>(&'a Registry);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Waits between attempts to reach a remote server again: doubling from the first, capped.
const RECONNECT_FIRST_DELAY: Duration = Duration::from_millis(500);
const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(30);

impl Registry {
    /// Connect to every enabled server at once; return when each is ready or has failed, which
    /// takes at most the slowest server's startup timeout.
    pub async fn start(config: Config) -> Arc<Registry> {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let registry = Arc::new(Registry {
            servers: DashMap::new(),
            catalog: watch::Sender::new(Arc::new(Catalog::default())),
            config,
            events: events_tx,
            in_flight: std::sync::atomic::AtomicUsize::new(0),
            breakers: DashMap::new(),
        });
        for spec in &registry.config.servers {
            registry.breakers.insert(
                spec.name.clone(),
                Breaker::new(spec.breaker_failures, spec.breaker_cool_down),
            );
            let status = if spec.enabled {
                Status::Starting
            } else {
                Status::Disabled
            };
            registry.servers.insert(
                spec.name.clone(),
                ServerState {
                    spec: spec.clone(),
                    status,
                    connection: None,
                    listing: Listing::default(),
                    startup: None,
                },
            );
        }
        let openings = registry
            .config
            .enabled_servers()
            .map(|spec| registry.open(spec));
        futures::future::join_all(openings).await;
        registry.publish();
        spawn_event_loop(Arc::downgrade(&registry), events_rx);
        registry
    }

    /// Reach a server and list what it offers.
    async fn connect(&self, spec: &ServerSpec) -> Result<(Connection, Listing), String> {
        let connection = Connection::open(spec, self.events.clone())
            .await
            .map_err(|error| error.to_string())?;
        let listing = connection.list().await.map_err(|error| error.to_string())?;
        Ok((connection, listing))
    }

    async fn open(&self, spec: &ServerSpec) {
        let started = Instant::now();
        let opened = self.connect(spec).await;
        let Some(mut state) = self.servers.get_mut(&spec.name) else {
            return;
        };
        state.startup = Some(started.elapsed());
        match opened {
            Ok((connection, listing)) => {
                tracing::info!(
                    server = %spec.name,
                    transport = spec.transport.kind(),
                    tools = listing.tools.len(),
                    prompts = listing.prompts.len(),
                    resources = listing.resources.len() + listing.templates.len(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "downstream ready"
                );
                state.status = Status::Ready;
                state.connection = Some(Arc::new(connection));
                state.listing = listing;
            }
            Err(error) => {
                tracing::error!(server = %spec.name, error = %error, "downstream failed to start");
                state.status = Status::Failed(error);
            }
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The current catalog.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.catalog.borrow().clone()
    }

    /// Follow catalog changes.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Catalog>> {
        self.catalog.subscribe()
    }

    /// The live connection to a server, if it is ready.
    pub fn connection(&self, server: &ServerName) -> Option<Arc<Connection>> {
        self.servers.get(server)?.connection.clone()
    }

    /// Every server's state, in config order.
    pub fn states(&self) -> Vec<ServerState> {
        self.config
            .servers
            .iter()
            .filter_map(|spec| self.servers.get(&spec.name).map(|state| state.clone()))
            .collect()
    }

    /// Why a server has no connection, for error messages.
    pub fn unavailable_reason(&self, server: &ServerName) -> String {
        match self.servers.get(server).map(|state| state.status.clone()) {
            Some(Status::Failed(reason)) => format!("server `{server}` is down: {reason}"),
            Some(Status::Reconnecting { attempt, error }) => {
                format!("server `{server}` is reconnecting (attempt {attempt}): {error}")
            }
            Some(status) => format!("server `{server}` is {}", status.label()),
            None => format!("server `{server}` is not configured"),
        }
    }

    /// May a call go to `server` now? `Err` says how long its open circuit has left.
    pub fn admit(&self, server: &ServerName) -> Result<(), Duration> {
        match self.breakers.get_mut(server) {
            Some(mut breaker) => breaker.admit(tokio::time::Instant::now()),
            None => Ok(()),
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

    /// Whether `server`'s circuit is open (or waiting on its trial call).
    pub fn circuit_open(&self, server: &ServerName) -> bool {
        self.breakers
            .get(server)
            .is_some_and(|breaker| !matches!(breaker.state(), BreakerState::Closed { .. }))
    }

    /// Count a request in flight while the returned guard lives.
    pub fn track(&self) -> InFlight<'_> {
        self.in_flight
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        InFlight(self)
    }

    /// Wait until no request is in flight, or `deadline` passes; say which.
    pub async fn drained(&self, deadline: Duration) -> bool {
        let until = Instant::now() + deadline;
        while self.in_flight.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            if Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Stop every downstream, each with a grace period to exit by itself.
    pub async fn shutdown(&self) {
        let connections: Vec<Arc<Connection>> = self
            .servers
            .iter_mut()
            .filter_map(|mut state| {
                if matches!(state.status, Status::Ready | Status::Reconnecting { .. }) {
                    state.status = Status::Stopped;
                }
                state.connection.take()
            })
            .collect();
        futures::future::join_all(connections.iter().map(|c| c.close(STOP_GRACE))).await;
    }

    /// Rebuild the catalog from the ready servers and publish it.
    fn publish(&self) {
        let states = self.states();
        let ready = states
            .iter()
            .filter(|state| state.status == Status::Ready)
            .map(|state| (&state.spec, &state.listing));
        let catalog = Catalog::build(&self.config.separator, ready);
        for warning in &catalog.warnings {
            tracing::warn!("{warning}");
        }
        self.catalog.send_replace(Arc::new(catalog));
    }

    async fn handle(self: &Arc<Self>, event: Event) {
        match event {
            Event::ListChanged { server, kind } => self.relist(&server, kind).await,
            Event::Closed { server, reason } => {
                let Some(mut state) = self.servers.get_mut(&server) else {
                    return;
                };
                if state.status != Status::Ready {
                    return;
                }
                tracing::error!(server = %server, reason = %reason, "downstream connection ended");
                let remote = !matches!(state.spec.transport, crate::config::Transport::Stdio(_));
                state.connection = None;
                state.status = if remote {
                    Status::Reconnecting {
                        attempt: 1,
                        error: format!("connection ended: {reason}"),
                    }
                } else {
                    Status::Failed(format!("connection ended: {reason}"))
                };
                drop(state);
                self.publish();
                if remote {
                    tokio::spawn(reconnect(Arc::downgrade(self), server));
                }
            }
        }
    }

    async fn relist(&self, server: &ServerName, kind: ListKind) {
        let Some(connection) = self.connection(server) else {
            return;
        };
        let mut listing = match self.servers.get(server) {
            Some(state) => state.listing.clone(),
            None => return,
        };
        if let Err(error) = connection.list_into(kind, &mut listing).await {
            // A connection that closed meanwhile is reported by its own `Closed` event.
            if !connection.peer.is_transport_closed() {
                tracing::warn!(server = %server, error = %error, "re-listing after a change failed");
            }
            return;
        }
        let changed = match self.servers.get_mut(server) {
            Some(mut state) if state.listing != listing => {
                state.listing = listing;
                true
            }
            _ => false,
        };
        if changed {
            tracing::info!(server = %server, ?kind, "downstream list changed");
            self.publish();
        }
    }
}

/// Reach a remote server again after its connection ended, waiting longer after each failure,
/// until it answers or the registry stops. Its tools return (with a list-changed notification to
/// clients) when it does.
async fn reconnect(registry: std::sync::Weak<Registry>, server: ServerName) {
    let mut delay = RECONNECT_FIRST_DELAY;
    let mut attempt = 1;
    loop {
        // Full jitter, so many conductors do not knock on a recovering server all at once.
        tokio::time::sleep(delay.mul_f64(0.5 + fastrand::f64() / 2.0)).await;
        let Some(registry) = registry.upgrade() else {
            return;
        };
        let spec = match registry.servers.get(&server) {
            Some(state) if matches!(state.status, Status::Reconnecting { .. }) => {
                state.spec.clone()
            }
            _ => return,
        };
        let outcome = registry.connect(&spec).await;
        let Some(mut state) = registry.servers.get_mut(&server) else {
            return;
        };
        if !matches!(state.status, Status::Reconnecting { .. }) {
            return; // stopped meanwhile
        }
        match outcome {
            Ok((connection, listing)) => {
                tracing::info!(server = %server, attempt, tools = listing.tools.len(), "downstream reconnected");
                state.status = Status::Ready;
                state.connection = Some(Arc::new(connection));
                state.listing = listing;
                drop(state);
                registry.publish();
                return;
            }
            Err(error) => {
                tracing::warn!(server = %server, attempt, error = %error, "downstream still unreachable");
                attempt += 1;
                state.status = Status::Reconnecting { attempt, error };
                delay = (delay * 2).min(RECONNECT_MAX_DELAY);
            }
        }
    }
}

/// Handle downstream events one at a time, for as long as the registry lives.
fn spawn_event_loop(
    registry: std::sync::Weak<Registry>,
    mut events: mpsc::UnboundedReceiver<Event>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            let Some(registry) = registry.upgrade() else {
                break;
            };
            registry.handle(event).await;
        }
    })
}
