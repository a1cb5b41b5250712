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
}

impl Registry {
    /// Connect to every enabled server at once; return when each is ready or has failed, which
    /// takes at most the slowest server's startup timeout.
    pub async fn start(config: Config) -> Arc<Registry> {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let registry = Arc::new(Registry {
            servers: DashMap::new(),
            catalog: watch::Sender::new(Arc::new(Catalog::default())),
            config,
        });
        for spec in &registry.config.servers {
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
            .map(|spec| registry.open(spec, events_tx.clone()));
        futures::future::join_all(openings).await;
        registry.publish();
        spawn_event_loop(Arc::downgrade(&registry), events_rx);
        registry
    }

    async fn open(&self, spec: &ServerSpec, events: mpsc::UnboundedSender<Event>) {
        let started = Instant::now();
        let opened = match Connection::open(spec, events).await {
            Ok(connection) => match connection.list().await {
                Ok(listing) => Ok((connection, listing)),
                Err(error) => Err(error.to_string()),
            },
            Err(error) => Err(error.to_string()),
        };
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
            Some(status) => format!("server `{server}` is {}", status.label()),
            None => format!("server `{server}` is not configured"),
        }
    }

    /// Stop every downstream, each with a grace period to exit by itself.
    pub async fn shutdown(&self) {
        let connections: Vec<Arc<Connection>> = self
            .servers
            .iter_mut()
            .filter_map(|mut state| {
                if state.status == Status::Ready {
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

    async fn handle(&self, event: Event) {
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
                state.status = Status::Failed(format!("connection ended: {reason}"));
                state.connection = None;
                drop(state);
                self.publish();
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
